"""PreemptionHook: on SIGTERM, save the current iteration and stop.

Slurm sends SIGTERM before it preempts, requeues or reaches a job's time
limit (``--signal=TERM@120``), then SIGKILL after a grace period; torchrun
forwards the SIGTERM it receives to its workers. Without this hook the
process dies at once and the iterations since the last periodic checkpoint
are lost.
"""
from __future__ import annotations

import signal
import threading
from typing import Optional

from mmengine.dist import get_dist_info
from mmengine.hooks import CheckpointHook, Hook
from mmengine.logging import print_log
from mmengine.registry import HOOKS

from ..distributed import ranks_with
from ..errors import Preempted

__all__ = ['PreemptionHook']


@HOOKS.register_module()
class PreemptionHook(Hook):
    """Stops training cleanly when the process receives SIGTERM.

    The signal handler only sets a flag. After each training iteration the
    ranks exchange their flags (:func:`mesa_seg.distributed.ranks_with`: one
    all-reduce of ``world_size`` int32s), so all of them stop after the same
    iteration, even when the signal reached only some. Then the runner's
    ``CheckpointHook`` saves that iteration (rank 0, atomically; skipped if
    it has just saved it) and every rank raises
    :class:`~mesa_seg.errors.Preempted`: ``tools/train.py`` prints one line
    and exits with 75. ``--resume`` continues exactly where the uninterrupted
    run would be (with :class:`SafeCheckpointHook` also in distributed runs).

    A signal during validation is acted on after the next training iteration.
    Saving must fit in the grace period between SIGTERM and SIGKILL (Slurm's
    ``GraceTime`` / ``--signal=TERM@SECONDS``, torchrun's
    ``--shutdown-timeout``, 30 s by default).

    Fires ``before_train`` (installs the handler; main thread only),
    ``after_train_iter`` (priority LOWEST: after the iteration's logging,
    scheduler step and periodic checkpoint) and ``after_train`` (restores
    the previous handler).

    Args:
        signals (tuple[str]): Signals that request the stop.
            Default: ('SIGTERM', ).
    """

    priority = 'LOWEST'

    def __init__(self, signals=('SIGTERM', )):
        self.signals = tuple(signals)
        self._received: Optional[int] = None
        self._previous: dict = {}

    # ------------------------------------------------------------- handler
    def _handle(self, signum, frame) -> None:
        if self._received is None:
            self._received = signum

    def install(self) -> None:
        """Install the handlers (no-op outside the main thread)."""
        if threading.current_thread() is not threading.main_thread():
            print_log('PreemptionHook: not in the main thread, SIGTERM is '
                      'not handled', logger='current')
            return
        for name in self.signals:
            sig = getattr(signal, name)
            self._previous.setdefault(sig, signal.signal(sig, self._handle))

    def restore(self) -> None:
        """Put the previous handlers back (idempotent)."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    # --------------------------------------------------------------- hooks
    def before_train(self, runner) -> None:
        self._received = None
        self.install()

    def after_train(self, runner) -> None:
        self.restore()

    def after_train_iter(self, runner, batch_idx: int, data_batch=None,
                         outputs=None) -> None:
        signalled = ranks_with(self._received is not None)
        if not signalled:
            return
        step = runner.iter + 1
        saved = self._save(runner, step)
        self.restore()
        rank, world_size = get_dist_info()
        name = signal.Signals(self._received).name if self._received \
            else 'SIGTERM'
        where = '' if world_size == 1 else (
            f' (on rank{"s" if len(signalled) > 1 else ""} '
            f'{", ".join(map(str, signalled))}; all {world_size} ranks '
            'stopped here)')
        kept = f'saved {saved}' if saved else \
            'nothing saved (no iteration-based CheckpointHook)'
        raise Preempted(
            f'{"signal" if rank in signalled else "a rank received"} {name}'
            f'{where}: stopped after iteration {step} of '
            f'{runner.max_iters}, {kept}; continue with --resume')

    @staticmethod
    def _save(runner, step: int) -> Optional[str]:
        hook = next((h for h in runner.hooks if isinstance(h, CheckpointHook)),
                    None)
        if hook is None or hook.by_epoch:
            return None
        path = hook.file_backend.join_path(hook.out_dir,
                                           hook.filename_tmpl.format(step))
        if hook.last_ckpt != path:  # not saved by its own schedule just now
            runner.logger.info(f'Saving checkpoint at {step} iterations '
                               '(preempted)')
            hook._save_checkpoint(runner)
            if type(hook) is CheckpointHook:  # no outcome broadcast
                from mmengine.dist import barrier
                barrier()
        return hook.last_ckpt
