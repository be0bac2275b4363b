"""Building the mmengine Runner from a config, as ``tools/train.py`` and
``tools/test.py`` do (no argument parsing: that is :mod:`mesa_seg.cli`).

Used by the CLI, ``tools/demo.py`` and the memory report. Bad input raises
:class:`~mesa_seg.errors.UsageError`.
"""
import logging
import os
import os.path as osp
import tempfile
from typing import Optional

import torch
from mmengine.config import Config
from mmengine.logging import print_log

from . import compat
from .errors import UsageError

__all__ = [
    'load_config', 'prepare_cfg', 'build_runner', 'set_work_dir',
    'check_work_dir'
]


def load_config(path: str, cfg_options: Optional[dict] = None) -> Config:
    """Load a config file and merge ``--cfg-options`` into it.

    Raises:
        UsageError: If the file is missing or unparsable, or the options do
            not fit the config's structure.
    """
    if not osp.isfile(path):
        raise UsageError(f'config file not found: {path}')
    try:
        cfg = Config.fromfile(path)
    except SyntaxError as e:
        raise UsageError(f'cannot parse config {path}: {e}') from None
    if cfg_options:
        try:
            cfg.merge_from_dict(cfg_options)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise UsageError(f'bad --cfg-options {cfg_options}: {e}') from None
    return cfg


def check_work_dir(work_dir: str) -> None:
    """Create ``work_dir`` if needed and check that it is writable.

    Raises:
        UsageError: Naming the folder and the reason.
    """
    try:
        os.makedirs(work_dir, exist_ok=True)
        with tempfile.TemporaryFile(dir=work_dir):
            pass
    except OSError as e:
        raise UsageError(
            f'work dir {work_dir} is not writable ({e.strerror}); '
            'choose another with --work-dir') from None


def set_work_dir(cfg: Config, work_dir: Optional[str],
                 config_path: str) -> None:
    """Set ``cfg.work_dir`` with mmseg's priority (``--work-dir`` > config >
    ``./work_dirs/<config name>``) and check it (:func:`check_work_dir`)."""
    if work_dir is not None:
        cfg.work_dir = work_dir
    elif cfg.get('work_dir') is None:
        cfg.work_dir = osp.join('./work_dirs',
                                osp.splitext(osp.basename(config_path))[0])
    check_work_dir(cfg.work_dir)


def prepare_cfg(cfg: Config, launcher: str = 'none',
                amp: bool = False) -> Config:
    """Adapt a config to this machine (in place) and return it.

    Without CUDA: SyncBN -> BN, a CUDA-only AmpOptimWrapper -> bf16 on CPU,
    and for distributed launchers the gloo process group.
    """
    cfg.launcher = launcher
    cuda = torch.cuda.is_available()
    optim_wrapper = cfg.get('optim_wrapper')
    if amp and optim_wrapper is not None:
        if optim_wrapper.get('type') in ('AmpOptimWrapper',
                                         'CPUAmpOptimWrapper'):
            print_log(
                'AMP training is already enabled in your config.',
                logger='current',
                level=logging.WARNING)
        elif optim_wrapper.get('type', 'OptimWrapper') != 'OptimWrapper':
            raise UsageError(
                '--amp needs optim_wrapper.type OptimWrapper, got '
                f'{optim_wrapper.get("type")}')
        else:
            # fp16 + dynamic loss scaling on GPUs, as mmseg
            optim_wrapper.type = 'AmpOptimWrapper'
            optim_wrapper.loss_scale = 'dynamic'
    if not cuda:
        compat.sync_bn_cfg_to_bn(cfg.get('model'))
        if optim_wrapper is not None and \
                optim_wrapper.get('type') == 'AmpOptimWrapper':
            optim_wrapper.type = 'CPUAmpOptimWrapper'
            optim_wrapper.pop('loss_scale', None)
            optim_wrapper.dtype = 'bfloat16'
        compat.setup_cpu_distributed(cfg, launcher)
    return cfg


def build_runner(cfg: Config):
    """Build the Runner as mmseg's tools do (``runner_type`` honoured)."""
    from mmengine.runner import Runner
    from mmseg.registry import RUNNERS
    if cfg.get('visualizer') is not None:
        # mmengine reuses a visualizer instance by name: a second run in one
        # process would log into the first run's work dir.
        cfg.visualizer.name = f"{cfg.visualizer.get('name', 'visualizer')}_{cfg.work_dir}"
    if 'runner_type' not in cfg:
        return Runner.from_cfg(cfg)
    return RUNNERS.build(cfg)
