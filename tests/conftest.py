"""Shared fixtures: a tiny generated demo dataset, the tiny test config, a
disk that fills up."""
import errno
import os
import os.path as osp

import pytest

from mesa_seg.setup_env import register_all_modules

# mmseg hard-imports mmcv.ops, which mmcv-lite lacks: apply the compat fixes and
# register mesa-seg's modules once, before any test module imports mmseg (what
# configs get through custom_imports=['mesa_seg.register']). Tests of a bare
# `import mesa_seg` run in fresh subprocesses (tests/test_architecture.py).
register_all_modules(init_default_scope=False)

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
TINY_CONFIG = osp.join(REPO, 'tests', 'data', 'tiny_upernet_swin.py')
LOADERS = ('train_dataloader', 'val_dataloader', 'test_dataloader')


@pytest.fixture(scope='session')
def demo_root(tmp_path_factory):
    """A 4 + 2 image demo set at 96 px (ADE20K layout)."""
    from mesa_seg.datasets import write_demo_dataset
    root = str(tmp_path_factory.mktemp('demo') / 'ade')
    write_demo_dataset(root, num_train=4, num_val=2, size=96, seed=0)
    return root


@pytest.fixture(scope='session')
def data_options(demo_root):
    """``--cfg-options`` pointing every dataloader at ``demo_root``."""
    return [f'{loader}.dataset.data_root={demo_root}' for loader in LOADERS]


@pytest.fixture
def disk_full_on(monkeypatch):
    """``disk_full_on(name)``: from now on, ``os.fsync`` of a file whose path
    contains ``name`` fails with ENOSPC (what a full disk does to a save);
    ``disk_full_on(None)``: the disk has room again."""
    fsync = os.fsync

    def fill(name):
        def fsync_or_full(fd):
            if name is not None and name in os.readlink(f'/proc/self/fd/{fd}'):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            fsync(fd)
        monkeypatch.setattr(os, 'fsync', fsync_or_full if name is not None else fsync)

    return fill
