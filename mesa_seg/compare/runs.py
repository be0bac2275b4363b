"""Train every variant with the same settings, then write the report.

Each variant is trained by ``tools/train.py`` in a fresh process (nothing
shared between the runs, as if a user ran them one after the other), from the
same initial weights, with the same seed, data and schedule.
"""
from __future__ import annotations

import os
import os.path as osp
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence

from .reading import read_run
from .report import write_report

__all__ = ['compare', 'write_initial_weights', 'schedule_options',
           'crop_options', 'train_in_subprocess', 'Train']

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
LOADERS = ('train_dataloader', 'val_dataloader', 'test_dataloader')

#: Runs ``tools/train.py`` with an argv and returns its exit code.
Train = Callable[[List[str]], int]


def train_in_subprocess(argv: List[str]) -> int:
    """``python tools/train.py ARGV`` in a fresh process, output streamed.

    Args:
        argv (list[str]): The arguments of ``tools/train.py``.

    Returns:
        int: Its exit code.
    """
    return subprocess.call(
        [sys.executable, osp.join(ROOT, 'tools', 'train.py'), *argv])


def crop_options(config: str, crop: Sequence[int]) -> List[str]:
    """``--cfg-options`` setting the train crop and the model input size.

    Args:
        config (str): The config's path.
        crop (Sequence[int]): Crop (h, w).

    Returns:
        list[str]: ``KEY=VALUE`` items for ``--cfg-options``.

    Raises:
        ValueError: The train pipeline has no ``RandomCrop``.
    """
    from mmengine.config import Config
    cfg = Config.fromfile(config)
    pipeline = cfg.train_dataloader.dataset.pipeline
    index = next((i for i, t in enumerate(pipeline)
                  if t.get('type') == 'RandomCrop'), None)
    if index is None:
        raise ValueError(f'{config}: no RandomCrop in the train pipeline')
    size = f'({crop[0]},{crop[1]})'
    return [f'train_dataloader.dataset.pipeline.{index}.crop_size={size}',
            f'model.data_preprocessor.size={size}']


def schedule_options(config: str, iters: int) -> List[str]:
    """``--cfg-options`` that scale the config's LR schedule (warm-up, poly
    decay, ...) from its ``max_iters`` to ``iters``.

    Args:
        config (str): The config's path.
        iters (int): The iterations the runs will train.

    Returns:
        list[str]: ``KEY=VALUE`` items for the iteration-based schedulers;
        empty when the config already trains ``iters`` iterations.
    """
    from mmengine.config import Config
    cfg = Config.fromfile(config)
    total = cfg.train_cfg.get('max_iters')
    schedulers = cfg.get('param_scheduler') or []
    if not total or total == iters:
        return []
    single = isinstance(schedulers, dict)
    out = []
    for i, s in enumerate([schedulers] if single else schedulers):
        if s.get('by_epoch', True):
            continue
        prefix = 'param_scheduler' if single else f'param_scheduler.{i}'
        begin = round(s.get('begin', 0) * iters / total)
        out.append(f'{prefix}.begin={begin}')
        if 'end' in s:
            end = max(begin + 1, round(s['end'] * iters / total))
            out.append(f'{prefix}.end={end}')
    return out


def write_initial_weights(config: str, seed: int, path: str) -> str:
    """Build ``config``'s model as the Runner does (seed, build,
    ``init_weights``) and save its weights to ``path``.

    Loaded with ``load_from`` by every run, so all start from the same
    weights: Mesa layers consume RNG when they are built, which would
    otherwise give the Mesa model other initial weights under the same seed.

    Args:
        config (str): The config whose model is built.
        seed (int): The random seed before building.
        path (str): The checkpoint to write.

    Returns:
        str: ``path``.
    """
    import torch
    from mmengine.config import Config
    from mmengine.logging import MMLogger
    from mmengine.registry import DefaultScope
    from mmengine.runner import set_random_seed

    from ..compat import sync_bn_cfg_to_bn
    from ..setup_env import register_all_modules
    register_all_modules(init_default_scope=False)  # scope set below
    from mmseg.registry import MODELS
    cfg = Config.fromfile(config)
    MMLogger.get_instance('compare_init', log_level='ERROR')  # quiet init
    set_random_seed(seed)
    with DefaultScope.overwrite_default_scope(cfg.get('default_scope',
                                                      'mmseg')):
        model = MODELS.build(sync_bn_cfg_to_bn(cfg.model))
    model.init_weights()
    torch.save(dict(state_dict=model.state_dict(), meta=dict(seed=seed)),
               path)
    return path


def compare(configs: Dict[str, str],
            data_root: str,
            out_dir: str,
            iters: int,
            seed: int = 0,
            crop: Optional[Sequence[int]] = None,
            batch: Optional[int] = None,
            val_interval: Optional[int] = None,
            options: Sequence[str] = (),
            same_init: bool = True,
            train: Train = train_in_subprocess) -> dict:
    """Train every config of ``configs`` (name -> path, baseline first) with
    the same settings and write the report to ``out_dir``.

    Args:
        configs (dict): Run name -> config path.
        data_root (str): Dataset root for every dataloader.
        out_dir (str): Report folder; run ``NAME`` trains in ``out_dir/NAME``.
        iters (int): Training iterations; each config's LR schedule is
            scaled from its ``max_iters`` to this.
        seed (int): ``randomness.seed`` of every run. Default: 0.
        crop (Sequence[int], optional): Train crop (h, w). Default: config's.
        batch (int, optional): Images per batch. Default: config's.
        val_interval (int, optional): Validate every N iterations (and at
            the end). Default: only at the end.
        options (Sequence[str]): More ``--cfg-options`` for every run.
        same_init (bool): Start every run from the first config's initial
            weights (see :func:`write_initial_weights`). Default: True.
        train (callable): Runs ``tools/train.py`` with an argv, returns its
            exit code. Default: :func:`train_in_subprocess`.

    Returns:
        dict: The report (as in ``report.json``).

    Raises:
        RuntimeError: A run's training exited with a non-zero code.
    """
    import torch

    from ..machine import describe_machine
    os.makedirs(out_dir, exist_ok=True)
    common = [f'{k}.dataset.data_root={data_root}' for k in LOADERS]
    common += [
        f'randomness.seed={seed}', f'train_cfg.max_iters={iters}',
        f'train_cfg.val_interval={val_interval or iters}',
        f'default_hooks.checkpoint.interval={iters}',
        'default_hooks.checkpoint.max_keep_ckpts=1'
    ]
    if batch:
        common.append(f'train_dataloader.batch_size={batch}')
    if same_init:
        init = write_initial_weights(
            next(iter(configs.values())), seed, osp.join(out_dir, 'init.pth'))
        common.append(f'load_from={init}')
    runs, wall = {}, {}
    for name, config in configs.items():
        # a visualizer name of its own: in one process (tests) mmengine would
        # reuse the first run's visualizer and its scalars.json
        argv = [config, '--work-dir', osp.join(out_dir, name), '--cfg-options',
                *common, f'visualizer.name=compare_{name}',
                *(crop_options(config, crop) if crop else []),
                *schedule_options(config, iters), *options]
        print(f'==> {name}: tools/train.py {" ".join(argv)}', flush=True)
        start = time.time()
        rc = train(argv)
        wall[name] = time.time() - start
        if rc != 0:
            raise RuntimeError(f'{name} training failed (exit code {rc})')
        runs[name] = read_run(osp.join(out_dir, name))
    # the runs train on CUDA when there is one (the Runner's choice)
    device = 'cuda' if torch.cuda.is_available() else 'cpu'
    setup = dict(
        configs=dict(configs), data_root=data_root, iters=iters, seed=seed,
        crop=list(crop) if crop else None, batch=batch,
        val_interval=val_interval, options=list(options), wall_s=wall,
        same_init=same_init, device=device,
        machine=describe_machine(device),
        threads=os.environ.get('OMP_NUM_THREADS'))
    return write_report(out_dir, runs, setup)
