"""Convergence of Mesa vs full precision: same data, seed and schedule.

Behind ``tools/compare_training.py``. Each variant is trained by
``tools/train.py`` in a fresh process (nothing shared between the two runs,
as if a user ran them one after the other), then:

- the loss of every iteration is read from the final checkpoint (mmengine's
  message hub keeps the unsmoothed per-iteration values);
- validation metrics (mIoU, aAcc, mAcc) from the run's ``scalars.json``;

and ``report.json`` (everything), ``report.md`` (table) and ``report.png``
(loss curves, mIoU) are written side by side.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import os.path as osp
import platform
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

__all__ = [
    'read_run', 'summarize', 'write_report', 'compare', 'main', 'SMOOTH'
]

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
LOADERS = ('train_dataloader', 'val_dataloader', 'test_dataloader')
SMOOTH = 10  # iterations in the moving average of plotted/summarised losses
LOSS_KEYS = ('loss', 'decode.loss_ce', 'aux.loss_ce')
METRICS = ('mIoU', 'aAcc', 'mAcc')

Train = Callable[[List[str]], int]


def _subprocess_train(argv: List[str]) -> int:
    """``python tools/train.py ARGV`` in a fresh process, output streamed."""
    return subprocess.call(
        [sys.executable, osp.join(ROOT, 'tools', 'train.py'), *argv])


# ------------------------------------------------------------ reading runs
def read_run(work_dir: str) -> dict:
    """Per-iteration losses and validation records of a finished run.

    Args:
        work_dir (str): The run's ``--work-dir``.

    Returns:
        dict: ``losses`` ({name: [float per iteration]}), ``val`` (list of
        ``{'step': int, 'mIoU': float, ...}``), ``iters``.
    """
    import torch
    with open(osp.join(work_dir, 'last_checkpoint')) as f:
        ckpt_path = f.read().strip()
    ckpt = torch.load(ckpt_path, map_location='cpu', weights_only=True)
    scalars = ckpt['message_hub']['log_scalars']
    losses = {
        key: [float(v) for v in scalars[f'train/{key}'].data[0]]
        for key in LOSS_KEYS if f'train/{key}' in scalars
    }
    val = []
    runs = sorted(glob.glob(osp.join(work_dir, '2*', 'vis_data',
                                     'scalars.json')))
    if runs:
        with open(runs[-1]) as f:
            for line in f:
                record = json.loads(line)
                if 'mIoU' in record:
                    val.append({k: record[k] for k in ('step', *METRICS)
                                if k in record})
    return dict(losses=losses, val=val, iters=ckpt['meta']['iter'])


def _moving_average(values: Sequence[float], window: int) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64)
    window = max(1, min(window, len(values)))
    kernel = np.ones(window) / window
    head = np.cumsum(values[:window - 1]) / np.arange(1, window)
    return np.concatenate([head, np.convolve(values, kernel, mode='valid')])


def summarize(run: dict, window: int = SMOOTH) -> dict:
    """Scalar figures of one run's loss curve and final validation."""
    loss = run['losses']['loss']
    tail = max(1, len(loss) // 10)
    out = dict(
        iters=len(loss),
        first_loss=float(np.mean(loss[:window])),
        final_loss=float(np.mean(loss[-tail:])),
        min_smoothed_loss=float(_moving_average(loss, window).min()),
        finite=bool(np.isfinite(loss).all()))
    if run['val']:
        out.update({k: run['val'][-1].get(k) for k in METRICS})
    return out


# ------------------------------------------------------------------ report
def _plot(runs: Dict[str, dict], path: str, window: int) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, (ax_loss, ax_iou) = plt.subplots(
        1, 2, figsize=(11, 4), gridspec_kw=dict(width_ratios=[2, 1]))
    colors = dict(zip(runs, ('tab:blue', 'tab:orange', 'tab:green')))
    for name, run in runs.items():
        loss = run['losses']['loss']
        steps = np.arange(1, len(loss) + 1)
        ax_loss.plot(steps, loss, color=colors[name], alpha=0.25, lw=0.8)
        ax_loss.plot(steps, _moving_average(loss, window), color=colors[name],
                     lw=2, label=f'{name} (moving average of {window})')
    curves = any(len(run['val']) > 1 for run in runs.values())
    for i, (name, run) in enumerate(runs.items()):
        if not run['val']:
            continue
        if curves:
            ax_iou.plot([v['step'] for v in run['val']],
                        [v['mIoU'] for v in run['val']], 'o-',
                        color=colors[name], label=name)
        else:  # one validation at the end: bars
            value = run['val'][-1]['mIoU']
            ax_iou.bar(i, value, color=colors[name])
            ax_iou.text(i, value, f'{value:.2f}', ha='center', va='bottom')
    ax_loss.set(xlabel='iteration', ylabel='training loss (decode + aux)',
                title='Training loss, same seed and data')
    ax_loss.legend()
    ax_loss.grid(alpha=0.3)
    if curves:
        ax_iou.set(xlabel='iteration')
        ax_iou.legend()
    else:
        ax_iou.set_xticks(range(len(runs)), list(runs))
    ax_iou.set(ylabel='mIoU (%)', title='Validation mIoU, end of training')
    ax_iou.grid(alpha=0.3, axis='y')
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _fmt(value, digits=2) -> str:
    return '-' if value is None else f'{value:.{digits}f}'


def write_report(out_dir: str, runs: Dict[str, dict], setup: dict,
                 window: int = SMOOTH) -> dict:
    """Write ``report.{json,md,png}`` for ``runs`` (name -> :func:`read_run`
    result, the baseline first). Returns the JSON content."""
    summaries = {name: summarize(run, window) for name, run in runs.items()}
    names = list(runs)
    report = dict(setup=setup, summary=summaries, runs=runs)
    if len(names) == 2:
        base, other = (summaries[n] for n in names)
        report['delta'] = {
            k: other[k] - base[k]
            for k in ('final_loss', *METRICS)
            if base.get(k) is not None and other.get(k) is not None
        }
    rows = [
        '| run | iters | loss, first 10 it. | loss, last 10% | min. smoothed '
        'loss | mIoU | aAcc | mAcc |', '|---|---|---|---|---|---|---|---|'
    ]
    for name in names:
        s = summaries[name]
        rows.append(f"| {name} | {s['iters']} | {_fmt(s['first_loss'], 3)} | "
                    f"{_fmt(s['final_loss'], 3)} | "
                    f"{_fmt(s['min_smoothed_loss'], 3)} | "
                    f"{_fmt(s.get('mIoU'))} | {_fmt(s.get('aAcc'))} | "
                    f"{_fmt(s.get('mAcc'))} |")
    lines = [
        '# Convergence: Mesa vs full precision', '',
        f"Configs: {', '.join(f'{n} = `{c}`' for n, c in setup['configs'].items())}.",
        f"Data: `{setup['data_root']}`; seed {setup['seed']}; "
        f"{setup['iters']} iterations; crop {setup.get('crop') or 'as config'}; "
        f"batch {setup.get('batch') or 'as config'}; "
        f"{setup['device']}, torch {setup['torch']}; wall time "
        + ', '.join(f'{n} {t / 60:.1f} min'
                    for n, t in setup['wall_s'].items()) + '.', '',
        *rows, ''
    ]
    first = {n: runs[n]['losses']['loss'][0] for n in names}
    lines.append(
        ('All runs start from the same initial weights (the first config\'s '
         f"init, seed {setup['seed']}). " if setup.get('same_init') else
         'Each run starts from its own initial weights. ') +
        'Loss at iteration 1 (Mesa\'s forward pass is exact: a difference '
        'comes from the weights, the batch or dropout/drop-path masks): ' +
        ', '.join(f'{n} {v:.4f}' for n, v in first.items()) + '.')
    lines.append('')
    if 'delta' in report:
        d = report['delta']
        lines.append(
            f"{names[1]} - {names[0]}: final loss {d.get('final_loss', 0):+.3f}"
            + (f", mIoU {d['mIoU']:+.2f} points" if 'mIoU' in d else '') + '.')
        lines.append('')
    lines.append('![loss curves and mIoU](report.png)')
    with open(osp.join(out_dir, 'report.md'), 'w') as f:
        f.write('\n'.join(lines) + '\n')
    with open(osp.join(out_dir, 'report.json'), 'w') as f:
        json.dump(report, f, indent=1)
    _plot(runs, osp.join(out_dir, 'report.png'), window)
    return report


# --------------------------------------------------------------------- run
def _crop_options(config: str, crop: Sequence[int]) -> List[str]:
    """``--cfg-options`` setting the train crop and the model input size."""
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


def write_initial_weights(config: str, seed: int, path: str) -> str:
    """Build ``config``'s model as the Runner does (seed, build,
    ``init_weights``) and save its weights to ``path``.

    Loaded with ``load_from`` by every run, so all start from the same
    weights: Mesa layers consume RNG when they are built, which would
    otherwise give the Mesa model other initial weights under the same seed.
    """
    import torch
    from mmengine.config import Config
    from mmengine.logging import MMLogger
    from mmengine.registry import DefaultScope
    from mmengine.runner import set_random_seed
    from mmseg.registry import MODELS

    from .compat import sync_bn_to_bn
    cfg = Config.fromfile(config)
    MMLogger.get_instance('compare_init', log_level='ERROR')  # quiet init
    set_random_seed(seed)
    with DefaultScope.overwrite_default_scope(cfg.get('default_scope',
                                                      'mmseg')):
        model = MODELS.build(sync_bn_to_bn(cfg.model))
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
            train: Train = _subprocess_train) -> dict:
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
            exit code. Default: a fresh subprocess.

    Returns:
        dict: The report (as in ``report.json``).
    """
    import torch
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
                *(_crop_options(config, crop) if crop else []),
                *_schedule_options(config, iters), *options]
        print(f'==> {name}: tools/train.py {" ".join(argv)}', flush=True)
        start = time.time()
        rc = train(argv)
        wall[name] = time.time() - start
        if rc != 0:
            raise RuntimeError(f'{name} training failed (exit code {rc})')
        runs[name] = read_run(osp.join(out_dir, name))
    setup = dict(
        configs=dict(configs), data_root=data_root, iters=iters, seed=seed,
        crop=list(crop) if crop else None, batch=batch,
        val_interval=val_interval, options=list(options), wall_s=wall,
        same_init=same_init,
        torch=torch.__version__, device=_device(),
        threads=os.environ.get('OMP_NUM_THREADS'))
    return write_report(out_dir, runs, setup)


def _schedule_options(config: str, iters: int) -> List[str]:
    """``--cfg-options`` that scale the config's LR schedule (warm-up, poly
    decay, ...) from its ``max_iters`` to ``iters``."""
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


def _device() -> str:
    import torch
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f'CPU ({platform.processor() or platform.machine()}, ' \
        f'{os.cpu_count()} cores)'


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        description='Train FP32 and Mesa with the same seed and data; '
        'report loss curves and mIoU side by side.')
    parser.add_argument('--baseline', default='configs/demo/upernet_swin_demo.py')
    parser.add_argument('--mesa',
                        default='configs/demo/upernet_swin_mesa_demo.py')
    parser.add_argument('--data-root', default='data/demo_ade',
                        help='written with the demo data if missing')
    parser.add_argument('--iters', type=int, default=200)
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--crop', type=int, nargs=2, metavar=('H', 'W'))
    parser.add_argument('--batch', type=int)
    parser.add_argument('--val-interval', type=int)
    parser.add_argument('--out', default='work_dirs/compare')
    parser.add_argument('--cfg-options', nargs='+', default=[],
                        metavar='KEY=VALUE', help='for both runs')
    parser.add_argument(
        '--own-init', action='store_true',
        help='each run initialises its own weights from the seed (default: '
        "both start from the baseline's initial weights)")
    args = parser.parse_args(argv)
    if not osp.isdir(args.data_root):
        from mesa_seg.datasets import write_demo_dataset
        print(f'writing the demo data to {args.data_root}', flush=True)
        write_demo_dataset(args.data_root)
    report = compare(
        dict(fp32=args.baseline, mesa=args.mesa), args.data_root, args.out,
        args.iters, args.seed, args.crop, args.batch, args.val_interval,
        args.cfg_options, same_init=not args.own_init)
    print(open(osp.join(args.out, 'report.md')).read())
    return 0 if all(s['finite'] for s in report['summary'].values()) else 1
