"""``report.png``: the training loss curves and the validation mIoU."""
from __future__ import annotations

from typing import Dict

import numpy as np

from .reading import moving_average

__all__ = ['plot_report']


def plot_report(runs: Dict[str, dict], path: str, window: int) -> None:
    """Draw the loss of every run (raw and smoothed) and its mIoU.

    Args:
        runs (dict): Run name -> :func:`~mesa_seg.compare.reading.read_run`
            result, the baseline first.
        path (str): The PNG to write.
        window (int): Moving-average window of the smoothed curves.
    """
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
        ax_loss.plot(steps, moving_average(loss, window), color=colors[name],
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
