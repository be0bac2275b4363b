"""Checkpoint file I/O: atomic writes through mmengine's file backends.

mmengine 0.10.7 writes checkpoints in place, so a killed save leaves a
truncated file under the final name. :func:`install_atomic_writes` makes
mmengine's local file backend :class:`AtomicLocalBackend`, which writes a
temporary file and ``os.replace``-s it onto the target.
:func:`mesa_seg.register_all_modules` installs it (nothing happens on import).
:func:`atomic_write` is the same for any local file; :func:`temp_target`
recognises the temporary files a killed save leaves
(``SafeCheckpointHook`` removes them at the next start).
"""
import os
import os.path as osp
import re
import uuid
from typing import Optional

from mmengine.fileio.backends import LocalBackend, register_backend

__all__ = [
    'AtomicLocalBackend', 'install_atomic_writes', 'atomic_write', 'temp_target'
]

# ``.{name}.{8 hex digits}.tmp``, as atomic_write names its temporary files
_TEMP_NAME = re.compile(r'^\.(?P<name>.+)\.[0-9a-f]{8}\.tmp$')


class AtomicLocalBackend(LocalBackend):
    """mmengine's local backend, writing files atomically.

    ``put``/``put_text`` write a temporary file in the target folder, flush it
    to disk and ``os.replace`` it onto the target (atomic on POSIX and
    Windows). A save that dies half-way leaves at most a ``.*.tmp`` file that
    no loader looks for; the previous file of that name stays intact.
    """

    def put(self, obj: bytes, filepath) -> None:
        atomic_write(str(filepath), obj)

    def put_text(self, obj: str, filepath, encoding: str = 'utf-8') -> None:
        atomic_write(str(filepath), obj.encode(encoding))


def atomic_write(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` durably and atomically: a temporary file in
    the same folder, flushed and fsync-ed, ``os.replace``-d onto ``path``,
    then the folder fsync-ed (so the rename itself survives a power loss).
    Readers see the old file or the new one, never a mix; an error (disk
    full, I/O error) raises with the old file intact and no temporary file
    left."""
    folder, name = osp.split(osp.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = osp.join(folder, f'.{name}.{uuid.uuid4().hex[:8]}.tmp')
    # os.open, not mkstemp: the file gets the usual umask-based mode, not 0600
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, 'wb') as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if osp.exists(tmp):
            os.remove(tmp)
        raise
    _fsync_dir(folder)


def _fsync_dir(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. Windows: folders cannot be opened
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems do not sync folders
        pass
    finally:
        os.close(fd)


def temp_target(filename: str) -> Optional[str]:
    """The file name a temporary file of :func:`atomic_write` was to become
    (``.iter_2.pth.1a2b3c4d.tmp`` -> ``iter_2.pth``), or None for other
    names."""
    match = _TEMP_NAME.match(osp.basename(filename))
    return match.group('name') if match else None


def install_atomic_writes() -> None:
    """Make mmengine's default local file backend :class:`AtomicLocalBackend`.

    Checkpoints (``Runner.save_checkpoint``), ``mmengine.dump`` and everything
    else written through ``mmengine.fileio`` to local paths then never leave a
    truncated file. Idempotent.
    """
    from mmengine.fileio import io as fileio_io
    register_backend('local', AtomicLocalBackend, force=True, prefixes='')
    # Drop plain LocalBackend instances cached before this ran.
    for key, backend in list(fileio_io.backend_instances.items()):
        if type(backend) is LocalBackend:
            del fileio_io.backend_instances[key]
