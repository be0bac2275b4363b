"""Read a finished training run back and reduce its loss curve to figures.

The loss of every iteration comes from the final checkpoint (mmengine's
message hub keeps the unsmoothed per-iteration values), the validation
metrics from the run's ``scalars.json``.
"""
from __future__ import annotations

import glob
import json
import os.path as osp
from typing import Sequence

import numpy as np

__all__ = ['read_run', 'moving_average', 'summarize', 'SMOOTH', 'LOSS_KEYS',
           'METRICS']

SMOOTH = 10  # iterations in the moving average of plotted/summarised losses
LOSS_KEYS = ('loss', 'decode.loss_ce', 'aux.loss_ce')
METRICS = ('mIoU', 'aAcc', 'mAcc')


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
    return dict(losses=losses, val=_read_validation(work_dir),
                iters=ckpt['meta']['iter'])


def _read_validation(work_dir: str) -> list:
    """The validation records of the latest ``scalars.json`` in ``work_dir``
    (one timestamped folder per launch; the last is this run's)."""
    paths = sorted(glob.glob(osp.join(work_dir, '2*', 'vis_data',
                                      'scalars.json')))
    if not paths:
        return []
    val = []
    with open(paths[-1]) as f:
        for line in f:
            record = json.loads(line)
            if 'mIoU' in record:
                val.append({k: record[k] for k in ('step', *METRICS)
                            if k in record})
    return val


def moving_average(values: Sequence[float], window: int) -> np.ndarray:
    """Trailing moving average of ``values``, as long as ``values``.

    Args:
        values (Sequence[float]): The curve.
        window (int): Values averaged per point (clipped to ``1 ..
            len(values)``); the first ``window - 1`` points average what is
            there so far.

    Returns:
        np.ndarray: The smoothed curve (float64).
    """
    values = np.asarray(values, dtype=np.float64)
    window = max(1, min(window, len(values)))
    kernel = np.ones(window) / window
    head = np.cumsum(values[:window - 1]) / np.arange(1, window)
    return np.concatenate([head, np.convolve(values, kernel, mode='valid')])


def summarize(run: dict, window: int = SMOOTH) -> dict:
    """Scalar figures of one run's loss curve and final validation.

    Args:
        run (dict): A :func:`read_run` result.
        window (int): Moving-average window for the first and the minimum
            smoothed loss. Default: :data:`SMOOTH`.

    Returns:
        dict: ``iters``, ``first_loss`` (mean of the first ``window``
        iterations), ``final_loss`` (mean of the last 10 %),
        ``min_smoothed_loss``, ``finite`` (every loss finite) and the last
        validation's :data:`METRICS` when the run validated.
    """
    loss = run['losses']['loss']
    tail = max(1, len(loss) // 10)
    out = dict(
        iters=len(loss),
        first_loss=float(np.mean(loss[:window])),
        final_loss=float(np.mean(loss[-tail:])),
        min_smoothed_loss=float(moving_average(loss, window).min()),
        finite=bool(np.isfinite(loss).all()))
    if run['val']:
        out.update({k: run['val'][-1].get(k) for k in METRICS})
    return out
