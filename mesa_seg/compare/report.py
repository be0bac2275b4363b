"""``report.json`` (everything), ``report.md`` (table) and ``report.png``."""
from __future__ import annotations

import json
import os.path as osp
from typing import Dict, List, Optional

from .plot import plot_report
from .reading import METRICS, SMOOTH, summarize

__all__ = ['build_report', 'markdown_lines', 'write_report']


def build_report(runs: Dict[str, dict], setup: dict,
                 window: int = SMOOTH) -> dict:
    """The content of ``report.json``.

    Args:
        runs (dict): Run name -> :func:`~mesa_seg.compare.reading.read_run`
            result, the baseline first.
        setup (dict): How the runs were made (see
            :func:`~mesa_seg.compare.runs.compare`).
        window (int): Moving-average window of the summaries. Default:
            :data:`~mesa_seg.compare.reading.SMOOTH`.

    Returns:
        dict: ``setup``, ``summary`` (name -> :func:`summarize`), ``runs``
        and, for two runs, ``delta`` (second minus first: final loss and the
        metrics both have).
    """
    summaries = {name: summarize(run, window) for name, run in runs.items()}
    report = dict(setup=setup, summary=summaries, runs=runs)
    if len(runs) == 2:
        base, other = summaries.values()
        report['delta'] = {
            k: other[k] - base[k]
            for k in ('final_loss', *METRICS)
            if base.get(k) is not None and other.get(k) is not None
        }
    return report


def _fmt(value: Optional[float], digits: int = 2) -> str:
    return '-' if value is None else f'{value:.{digits}f}'


def _summary_table(summaries: Dict[str, dict]) -> List[str]:
    rows = [
        '| run | iters | loss, first 10 it. | loss, last 10% | min. smoothed '
        'loss | mIoU | aAcc | mAcc |', '|---|---|---|---|---|---|---|---|'
    ]
    for name, s in summaries.items():
        rows.append(f"| {name} | {s['iters']} | {_fmt(s['first_loss'], 3)} | "
                    f"{_fmt(s['final_loss'], 3)} | "
                    f"{_fmt(s['min_smoothed_loss'], 3)} | "
                    f"{_fmt(s.get('mIoU'))} | {_fmt(s.get('aAcc'))} | "
                    f"{_fmt(s.get('mAcc'))} |")
    return rows


def _machine_line(setup: dict) -> str:
    """What trained: the device and the versions, from
    :func:`mesa_seg.machine.describe_machine`."""
    m = setup['machine']
    if setup.get('device') == 'cuda':
        where = f"CUDA ({m['device_name']})"
    else:
        where = f"CPU ({m['device_name']}, {m['cpu_count']} cores)"
    return (f"Machine: {where}; torch {m['torch']}, mmseg {m['mmseg']}, "
            f"mmengine {m['mmengine']}, python {m['python']} "
            f"({m['platform']}).")


def markdown_lines(report: dict) -> List[str]:
    """The lines of ``report.md`` for a :func:`build_report` result."""
    setup, summaries, runs = report['setup'], report['summary'], report['runs']
    names = list(runs)
    configs = ', '.join(f'{n} = `{c}`' for n, c in setup['configs'].items())
    wall = ', '.join(f'{n} {t / 60:.1f} min'
                     for n, t in setup['wall_s'].items())
    lines = [
        '# Convergence: Mesa vs full precision', '',
        f'Configs: {configs}.',
        f"Data: `{setup['data_root']}`; seed {setup['seed']}; "
        f"{setup['iters']} iterations; crop {setup.get('crop') or 'as config'}; "
        f"batch {setup.get('batch') or 'as config'}; wall time {wall}.",
        _machine_line(setup), '',
        *_summary_table(summaries), ''
    ]
    first = ', '.join(f"{n} {runs[n]['losses']['loss'][0]:.4f}" for n in names)
    lines.append(
        ('All runs start from the same initial weights (the first config\'s '
         f"init, seed {setup['seed']}). " if setup.get('same_init') else
         'Each run starts from its own initial weights. ') +
        'Loss at iteration 1 (Mesa\'s forward pass is exact: a difference '
        'comes from the weights, the batch or dropout/drop-path masks): ' +
        first + '.')
    lines.append('')
    if 'delta' in report:
        d = report['delta']
        lines.append(
            f"{names[1]} - {names[0]}: final loss {d.get('final_loss', 0):+.3f}"
            + (f", mIoU {d['mIoU']:+.2f} points" if 'mIoU' in d else '') + '.')
        lines.append('')
    lines.append('![loss curves and mIoU](report.png)')
    return lines


def write_report(out_dir: str, runs: Dict[str, dict], setup: dict,
                 window: int = SMOOTH) -> dict:
    """Write ``report.{json,md,png}`` to ``out_dir``.

    Args:
        out_dir (str): The report folder (exists).
        runs (dict): Run name -> :func:`~mesa_seg.compare.reading.read_run`
            result, the baseline first.
        setup (dict): How the runs were made; ``machine`` is a
            :func:`mesa_seg.machine.describe_machine` result and ``device``
            ``'cpu'`` or ``'cuda'`` (see :func:`~mesa_seg.compare.runs.compare`).
        window (int): Moving-average window of the summaries and the plotted
            curves. Default: :data:`~mesa_seg.compare.reading.SMOOTH`.

    Returns:
        dict: The report, as written to ``report.json``.
    """
    report = build_report(runs, setup, window)
    with open(osp.join(out_dir, 'report.md'), 'w') as f:
        f.write('\n'.join(markdown_lines(report)) + '\n')
    with open(osp.join(out_dir, 'report.json'), 'w') as f:
        json.dump(report, f, indent=1)
    plot_report(runs, osp.join(out_dir, 'report.png'), window)
    return report
