"""Rows -> ``leaderboard.json`` and ``leaderboard.md``.

Every ratio compares two cells of the same model measured in the same run:
``ratios`` are to the model's ``fp32`` cell; "Mesa's own saving" compares
``mesa`` with ``fused_loss`` (both use the fused loss, so the difference is
Mesa's 8-bit activations alone); "mesa vs cp" compares Mesa with activation
checkpointing, the exact alternative a user would otherwise pick.
"""
from __future__ import annotations

import json
from typing import Dict, List, Optional, Sequence

from ..strategies import STRATEGIES, strategy_table
from .cells import REFERENCE

__all__ = ['RATIO_FIGURES', 'add_ratios', 'pareto_front', 'compare', 'model_summary',
           'build_leaderboard', 'write_json', 'write_markdown', 'model_section',
           'markdown_lines']

#: ratio name -> row key; each row's ``ratios[name]`` = its value / fp32's
RATIO_FIGURES = {
    'peak': 'peak_mib',
    'peak_reserved': 'peak_reserved_mib',
    'activation': 'activation_mib',
    'step_time': 'step_s',
    'step_cpu_time': 'step_cpu_s',
    'max_batch': 'max_batch',
}


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return a / b if a is not None and b else None


def _models(rows: Sequence[Dict]) -> List[str]:
    return list(dict.fromkeys(r['model'] for r in rows))


def _measured(r: Dict) -> bool:
    return not r.get('error') and not r.get('skipped')


def _cell(rows: Sequence[Dict], model: str, strategy: str) -> Optional[Dict]:
    """The row of ``model`` x ``strategy`` if it was measured without error."""
    return next((r for r in rows if r['model'] == model and r['strategy'] == strategy
                 and _measured(r)), None)


def add_ratios(rows: List[Dict]) -> None:
    """Set every row's ``ratios`` to its figures over its model's fp32 cell's
    (None where either is missing, or the fp32 cell failed)."""
    for r in rows:
        ref = _cell(rows, r['model'], REFERENCE)
        r['ratios'] = {name: None if ref is None or not _measured(r) else
                       _ratio(r.get(key), ref.get(key)) for name, key in RATIO_FIGURES.items()}


def pareto_front(rows: Sequence[Dict], model: str) -> List[str]:
    """Strategies of ``model`` that no other strategy beats on both peak memory
    and step time (at least as good on both, better on one), lowest peak first."""
    points = [r for r in rows if r['model'] == model and _measured(r)
              and r.get('peak_mib') is not None and r.get('step_s') is not None]
    front = [r for r in points if not any(
        o['peak_mib'] <= r['peak_mib'] and o['step_s'] <= r['step_s']
        and (o['peak_mib'] < r['peak_mib'] or o['step_s'] < r['step_s']) for o in points)]
    return [r['strategy'] for r in sorted(front, key=lambda r: (r['peak_mib'], r['step_s']))]


def compare(rows: Sequence[Dict], model: str, strategy: str, other: str,
            figures: Sequence[str]) -> Optional[Dict[str, Optional[float]]]:
    """``{figure: strategy's value / other's value}`` for ``figures`` (ratio
    names of :data:`RATIO_FIGURES`); None if either cell is missing or failed."""
    a, b = _cell(rows, model, strategy), _cell(rows, model, other)
    if a is None or b is None:
        return None
    return {f: _ratio(a.get(RATIO_FIGURES[f]), b.get(RATIO_FIGURES[f])) for f in figures}


def model_summary(rows: Sequence[Dict], model: str) -> Dict:
    """Mesa's own saving (``mesa`` / ``fused_loss``: activation, peak, step
    time), ``mesa`` / ``cp`` (peak, step time) and the Pareto front."""
    return dict(
        mesa_vs_fused_loss=compare(rows, model, 'mesa', 'fused_loss',
                                   ('activation', 'peak', 'step_time')),
        mesa_vs_cp=compare(rows, model, 'mesa', 'cp', ('peak', 'step_time')),
        pareto_front=pareto_front(rows, model))


def build_leaderboard(rows: List[Dict], machine: Dict, settings: Dict, command: str,
                      date: Optional[str] = None, cells_total: Optional[int] = None) -> Dict:
    """The ``leaderboard.json`` document (ratios added to ``rows``);
    ``cells_total``: how many cells the run has in all (more than ``rows`` while
    it is still running)."""
    add_ratios(rows)
    return dict(rows=rows, machine=machine, settings=settings, command=command, date=date,
                cells_total=len(rows) if cells_total is None else cells_total,
                strategies={n: STRATEGIES[n].description for n in
                            dict.fromkeys(r['strategy'] for r in rows)},
                summary={m: model_summary(rows, m) for m in _models(rows)},
                failed=sum(bool(r.get('error') or r.get('sweep_error')) for r in rows),
                skipped=sum(bool(r.get('skipped')) for r in rows))


def write_json(board: Dict, path: str) -> None:
    with open(path, 'w') as f:
        json.dump(board, f, indent=1, allow_nan=False)


# ------------------------------------------------------------------ markdown
def _x(q: Optional[float]) -> str:
    return '–' if q is None else f'{q:.2f}×'


def _num(x: Optional[float], fmt: str) -> str:
    return '–' if x is None else format(x, fmt)


def _fmt(value: float, fmt: str) -> str:
    if fmt == 'MiB':  # whole MiB, one decimal below 100 MiB
        return f'{value:,.0f}' if value >= 100 else f'{value:.1f}'
    return format(value, fmt)


def _with_ratio(r: Dict, key: str, ratio: str, fmt: str) -> str:
    value = r.get(key)
    if value is None:
        return '–'
    if r['strategy'] == REFERENCE:
        return f'{_fmt(value, fmt)} (ref.)'
    q = r['ratios'].get(ratio)
    return _fmt(value, fmt) + ('' if q is None else f' ({q:.2f}×)')


def _checkpointing(value) -> str:
    return {False: 'none', True: 'every block', 'selective': 'selective'}.get(value, '–') \
        if value is not None else '–'


def _backbone(r: Dict) -> str:
    name = r.get('backbone') or '–'
    layers = r.get('mesa_layers')
    return f'{name}, {layers} Mesa layers' if layers else name


def _forward(r: Dict) -> str:
    if not _measured(r):
        return '–'
    if r['strategy'] == REFERENCE:
        return 'reference'
    exact = r.get('forward_exact')
    if exact is None:
        return '–'
    if exact:
        return 'yes'
    diff = r.get('forward_max_abs_diff')
    detail = [r.get('forward_dtype') or '']
    if diff is not None:
        detail.append(f'max abs diff {diff:.2g}')
    return 'no (' + ', '.join(d for d in detail if d) + ')'


def _cosine(r: Dict) -> str:
    if not _measured(r):
        return '–'
    if r['strategy'] == REFERENCE:
        return 'reference'
    c = r.get('grad_cosine')
    if c is None:
        return '–'
    return f'{c:.6f}' + (' (bit-identical)' if r.get('grad_exact') else '')


def _max_batch(r: Dict) -> str:
    b = r.get('max_batch')
    if b is None:
        return '–'
    text = f"{'' if r.get('max_batch_exact', True) else '≥ '}{b}"
    q = r['ratios'].get('max_batch')
    return text if r['strategy'] == REFERENCE or q is None else f'{text} ({q:.2f}×)'


def _row(cells) -> str:
    return '| ' + ' | '.join(str(c) for c in cells) + ' |'


def model_table(rows: Sequence[Dict], model: str, cuda: bool, sweep: bool) -> List[str]:
    header = ['strategy', 'loss', 'backbone', 'checkpointing', 'precision',
              'peak, MiB (× fp32)']
    if cuda:
        header.append('peak reserved, MiB')
    header += ['activation, MiB (× fp32)', 'step, s (× fp32)']
    if not cuda:
        header.append('step CPU time, s (× fp32)')
    if sweep:
        header.append('max batch ≤ fp32 peak')
    header += ['grad cosine vs fp32', 'forward exact']
    lines = [_row(header), _row(['---'] * 5 + ['---:'] * (len(header) - 7) + ['---'] * 2)]
    for r in rows:
        if r['model'] != model:
            continue
        inc = r['includes'] or {}
        cells = [f"`{r['strategy']}`" + (' **failed**' if r.get('error') else
                                          ' (skipped)' if r.get('skipped') else ''),
                 r.get('loss') or inc.get('loss', '–'), _backbone(r),
                 _checkpointing(r.get('checkpointing')) if r.get('checkpointing') is not None
                 else inc.get('checkpointing', '–'),
                 r.get('precision') or inc.get('precision', '–'),
                 _with_ratio(r, 'peak_mib', 'peak', 'MiB')]
        if cuda:
            cells.append(_with_ratio(r, 'peak_reserved_mib', 'peak_reserved', 'MiB'))
        cells += [_with_ratio(r, 'activation_mib', 'activation', 'MiB'),
                  _with_ratio(r, 'step_s', 'step_time', '.2f')]
        if not cuda:
            cells.append(_with_ratio(r, 'step_cpu_s', 'step_cpu_time', '.2f'))
        if sweep:
            cells.append(_max_batch(r))
        cells += [_cosine(r), _forward(r)]
        lines.append(_row(cells))
    return lines


def summary_lines(summary: Dict) -> List[str]:
    own, cp = summary['mesa_vs_fused_loss'], summary['mesa_vs_cp']
    lines = []
    if own is None:
        lines.append("- Mesa's own saving (mesa vs fused_loss, same loss function): not measured "
                     '(needs both cells)')
    else:
        lines.append(f"- Mesa's own saving (mesa vs fused_loss, same loss function): activation "
                     f"{_x(own['activation'])}, peak {_x(own['peak'])}, step time "
                     f"{_x(own['step_time'])}")
    if cp is None:
        lines.append('- mesa vs cp: not measured (needs both cells)')
    else:
        lines.append(f"- mesa vs cp: peak {_x(cp['peak'])}, step time {_x(cp['step_time'])}")
    front = summary['pareto_front']
    lines.append('- Pareto front (no other strategy has both a lower peak and a shorter '
                 'step): ' + (', '.join(f'`{s}`' for s in front) if front else '–'))
    return lines


def model_section(board: Dict, model: str, plot: Optional[str] = None) -> List[str]:
    rows, s = board['rows'], board['settings']
    config = next(r['config'] for r in rows if r['model'] == model)
    lines = [f'## {model} (`{config}`)', '']
    lines += model_table(rows, model, s['device'] == 'cuda', bool(s.get('sweep')))
    lines += [''] + summary_lines(board['summary'][model])
    if plot:
        lines += ['', f'![{model}: peak memory vs step time]({plot})']
    return lines


def _header(board: Dict) -> List[str]:
    m, s = board['machine'], board['settings']
    done, total = len(board['rows']), board.get('cells_total') or len(board['rows'])
    partial = ['', f'**Partial**: {done} of {total} cells measured so far (the run is '
               'still going, or was stopped).'] if done < total else []
    size = 'x'.join(str(x) for x in s['size']) if s.get('size') else "each config's crop size"
    device = 'CPU' if s['device'] == 'cpu' else 'CUDA'
    return [
        '# Strategy leaderboard',
        '',
        f"{device} ({m['device_name']}), {size}, batch {s['batch']}, {s['steps']} timed "
        f"step{'s' * (s['steps'] != 1)} after {s['warmup']} warm-up, seed {s['seed']}; "
        f"torch {m['torch']}, mmseg "
        f"{m['mmseg']}, mmengine {m['mmengine']}, Python {m['python']}, "
        f"{m.get('torch_threads') or '?'} torch threads on {m['cpu_count']} CPUs, Mesa kernels: "
        f"{m.get('mesa_backend') or '–'}; {board.get('date') or ''}.",
        '',
        'Reproduce:',
        '',
        '```',
        board['command'],
        '```',
    ] + partial


def _notes(board: Dict) -> List[str]:
    cpu = board['settings']['device'] == 'cpu'
    peak = ("bytes of live CPU tensors at the step's peak, from the allocator's own events "
            '(weights, gradients and optimizer state included)' if cpu else
            '`torch.cuda.max_memory_allocated` over the timed steps (reserved: '
            '`max_memory_reserved`, what the caching allocator held)')
    lines = [
        '## How the figures were measured', '',
        '- Every cell (model x strategy) ran in a fresh process, from the same initial '
        "weights (the fp32 cell's, written after `init_weights()`; Mesa models load them "
        'with only their quantizer buffers absent), the same synthetic batch and the same '
        'seed (re-seeded right before the first training step).',
        f'- **peak**: {peak}. **activation**: bytes autograd keeps for backward after '
        'forward + loss (unique storages, parameters excluded). **step**: median wall '
        'time of the timed steps (forward, backward, optimizer step)' + (
            '; **step CPU time**: CPU seconds of all the process\'s threads per step, less '
            'affected than wall time by other jobs on a shared machine.' if cpu else '.'),
        '- **grad cosine**: cosine similarity (float64) of all parameter gradients of the '
        "first training step, concatenated by parameter name, against the fp32 cell's. "
        "**forward exact**: `torch.equal` of the decode head's output in that step "
        "(dtype included) against fp32's. Both are measured, except in the fp32 row, "
        'which is the reference.',
        '- Ratios (×) are to the fp32 cell of the same model in this run.',
    ]
    if board['settings'].get('sweep'):
        lines.append("- **max batch**: largest batch whose peak (CUDA: reserved memory) "
                     "stays within the fp32 cell's at the run's batch, each probe in a fresh "
                     'process; "≥" where the search stopped before the boundary.')
    return lines


def markdown_lines(board: Dict, plots: Optional[Dict[str, str]] = None) -> List[str]:
    """The whole ``leaderboard.md``."""
    plots = plots or {}
    lines = _header(board) + ['', '## What each strategy includes', '']
    lines += strategy_table(list(board['strategies']))
    for model in _models(board['rows']):
        lines += [''] + model_section(board, model, plots.get(model))
    failed = [r for r in board['rows'] if r.get('error') or r.get('sweep_error')]
    if failed:
        lines += ['', '## Failed cells', '', '| model | strategy | error | log |',
                  '| --- | --- | --- | --- |']
        lines += [_row([r['model'], f"`{r['strategy']}`",
                        (r['error'] or f"batch sweep: {r['sweep_error']}").replace('|', '\\|'),
                        f"`{r['log']}`" if r.get('log') else '–']) for r in failed]
    skipped = [r for r in board['rows'] if r.get('skipped')]
    if skipped:
        lines += ['', '## Skipped cells', '', '| model | strategy | why |', '| --- | --- | --- |']
        lines += [_row([r['model'], f"`{r['strategy']}`", r['skipped'].replace('|', '\\|')])
                  for r in skipped]
    lines += [''] + _notes(board) + ['']
    return lines


def write_markdown(board: Dict, path: str, plots: Optional[Dict[str, str]] = None) -> None:
    with open(path, 'w') as f:
        f.write('\n'.join(markdown_lines(board, plots)))
