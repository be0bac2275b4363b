"""Shared fixtures: a tiny generated demo dataset and the tiny test config."""
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
