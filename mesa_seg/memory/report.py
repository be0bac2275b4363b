"""Turn measurements into ``report.json`` and ``report.md`` (ratios included)."""
from __future__ import annotations

import json
import os
from typing import Dict, List, Optional

from .breakdown import part_sort_key

__all__ = ['add_ratios', 'write_json', 'write_markdown', 'MiB']

MiB = 1024 ** 2

#: figure -> path into a result dict; every one gets a ratio to the baseline
RATIO_FIGURES = {
    'peak': ('peak',),
    'activation': ('activation', 'total'),
    'activation_uncompressed': ('activation', 'uncompressed'),
    'step_time': ('step_time', 'median'),
    'step_cpu_time': ('step_cpu_time', 'median'),
    'peak_rss': ('peak_rss',),
    'rss_step_growth': ('rss_step_growth',),
    'max_batch': ('sweep', 'max_batch'),
}


def _get(result: Dict, path) -> Optional[float]:
    node = result
    for key in path:
        if not isinstance(node, dict) or node.get(key) is None:
            return None
        node = node[key]
    return node


def add_ratios(results: List[Dict], baseline: Dict) -> None:
    """Set ``result['ratios'][figure] = figure / baseline's figure`` (None where
    either is missing or the baseline's is 0)."""
    for r in results:
        ratios = {}
        for name, path in RATIO_FIGURES.items():
            a, b = _get(r, path), _get(baseline, path)
            ratios[name] = a / b if a is not None and b else None
        r['ratios'] = ratios


def write_json(report: Dict, path: str) -> None:
    with open(path, 'w') as f:
        json.dump(report, f, indent=1)


def _mib(x: Optional[float]) -> str:
    return '–' if x is None else f'{x / MiB:,.0f}'


def _ratio(x: Optional[float]) -> str:
    return '' if x is None else f' ({x:.2f}×)'


def _row(cells) -> str:
    return '| ' + ' | '.join(str(c) for c in cells) + ' |'


def _table(header: List[str], rows: List[List], align: Optional[str] = None) -> List[str]:
    align = align or 'l' + 'r' * (len(header) - 1)
    sep = ['---:' if a == 'r' else '---' for a in align]
    return [_row(header), _row(sep)] + [_row(r) for r in rows]


def _label(r: Dict, baseline: Dict) -> str:
    return f"{r['name']} (baseline)" if r is baseline else r['name']


def _setup_cells(r: Dict) -> List[str]:
    """What the run trained with, read from the built model: loss,
    checkpointing, precision."""
    m = r.get('model') or {}
    cp = m.get('checkpointing')
    cp = {False: 'none', True: 'every backbone block', None: '–'}.get(cp, cp)
    return [m.get('loss', '–'), cp, m.get('precision', '–')]


def main_table(results: List[Dict], baseline: Dict, budget: Optional[float]) -> List[str]:
    cpu = baseline['device'] == 'cpu'
    header = ['config', 'loss', 'checkpointing', 'precision', 'peak training memory, MiB',
              'activation memory, MiB', 'step time, s']
    if cpu:
        header += ['CPU time, s', 'peak RSS, MiB']
    if budget is not None:
        header.append(f'max batch ≤ {budget / MiB:,.0f} MiB')
    rows = []
    for r in results:
        q = r['ratios']
        if r.get('oom'):
            rows.append([_label(r, baseline), 'out of memory'] + [''] * (len(header) - 2))
            continue
        row = [_label(r, baseline)] + _setup_cells(r) + [
               _mib(r['peak']) + _ratio(q['peak']),
               _mib(r['activation']['total']) + _ratio(q['activation']),
               f"{r['step_time']['median']:.2f}" + _ratio(q['step_time'])]
        if cpu:
            row += [f"{r['step_cpu_time']['median']:.2f}" + _ratio(q['step_cpu_time']),
                    _mib(r['peak_rss']) + _ratio(q['peak_rss'])]
        if budget is not None:
            s = r.get('sweep')
            row.append('–' if s is None else
                       f"{'' if s['exact'] else '≥ '}{s['max_batch']}" + _ratio(q['max_batch']))
        rows.append(row)
    return _table(header, rows, 'llll' + 'r' * (len(header) - 4))


def part_table(results: List[Dict]) -> List[str]:
    parts = sorted({p for r in results if r.get('activation')
                    for p in r['activation']['by_part']}, key=part_sort_key)
    header = ['part'] + [r['name'] for r in results if r.get('activation')]
    rows = []
    for p in parts + ['total']:
        row = [f'**{p}**' if p == 'total' else p]
        for r in results:
            a = r.get('activation')
            if not a:
                continue
            cell = a['by_part'].get(p) if p != 'total' else a
            if not cell:
                row.append('–')
                continue
            total = cell['compressed'] + cell['uncompressed']
            share = f" ({100 * cell['compressed'] / total:.0f}% 8-bit)" \
                if cell['compressed'] and total else ''
            row.append(f'{total / MiB:,.1f}{share}')
        rows.append(row)
    return _table(header, rows)


def op_table(results: List[Dict], top: int = 12) -> List[str]:
    totals: Dict[str, int] = {}
    for r in results:
        for op, cell in (r.get('activation') or {}).get('by_op', {}).items():
            totals[op] = max(totals.get(op, 0), cell['compressed'] + cell['uncompressed'])
    ops = sorted(totals, key=lambda o: -totals[o])
    header = ['op (saved by)'] + [r['name'] for r in results if r.get('activation')]
    rows = []
    for op in ops[:top]:
        row = [f'`{op}`']
        for r in results:
            a = r.get('activation')
            if a:
                cell = a['by_op'].get(op)
                row.append('–' if not cell else
                           f"{(cell['compressed'] + cell['uncompressed']) / MiB:,.1f}")
        rows.append(row)
    if len(ops) > top:
        rows.append([f'{len(ops) - top} more ops'] + [''] * (len(header) - 1))
    return _table(header, rows)


def largest_table(r: Dict, top: int = 8) -> List[str]:
    rows = [[f"{t['nbytes'] / MiB:,.1f}", t['part'], f"`{t['op']}`",
             f"`{t['module'] or '<root>'}`", f"{t['dtype']} {tuple(t['shape'])}"]
            for t in r['activation']['largest'][:top]]
    return _table(['MiB', 'part', 'op', 'module', 'tensor'], rows, 'rllll')


def peak_context(ops: Optional[List[str]]) -> str:
    """``['autograd::engine::evaluate_function: XBackward0', 'XBackward0', 'aten::y']``
    -> ``'XBackward0 › aten::y'``: the profiler events running at the peak."""
    if not ops:
        return '–'
    prefix = 'autograd::engine::evaluate_function: '
    names: List[str] = []
    for op in ops:
        op = op[len(prefix):] if op.startswith(prefix) else op
        if not names or names[-1] != op:
            names.append(op)
    return ' › '.join(f'`{n}`' for n in names[-3:])


def composition_table(results: List[Dict]) -> List[str]:
    cpu = any('peak_at' in r for r in results)
    rows = []
    for r in results:
        if r.get('oom'):
            continue
        row = [r['name'], _mib(r.get('params')), _mib(r.get('optimizer_state')),
               _mib(r['step_start']), _mib(r['peak'] - r['step_start']), _mib(r['peak'])]
        rows.append(row + [peak_context(r.get('peak_at'))] if cpu else row)
    header = ['config', 'weights', 'optimizer state', 'at step start', 'added by the step',
              'peak']
    return _table(header + ['peak reached in'] if cpu else header, rows,
                  'lrrrrr' + 'l' * cpu)


def crosscheck_table(results: List[Dict]) -> List[str]:
    rows = []
    for r in results:
        if r.get('oom') or r.get('rss_step_growth') is None:
            continue
        alloc = r['peak'] - r['step_start']
        rss = r['rss_step_growth']
        diff = f'{100 * (rss - alloc) / alloc:+.1f}%' if alloc else '–'
        rows.append([r['name'], _mib(alloc), _mib(rss), diff])
    return _table(['config', 'allocator: peak − start of step, MiB',
                   'RSS: peak − start of step, MiB', 'RSS vs allocator'], rows)


def write_markdown(report: Dict, path: str) -> None:
    """``report.md``: the figures as tables, with how each was measured."""
    results = report['results']
    baseline = next(r for r in results if r['name'] == report['baseline'])
    env, s = report['environment'], report['settings']
    cpu = s['device'] == 'cpu'
    budget = s.get('budget')
    size = 'x'.join(str(x) for x in baseline['size'])
    lines = [
        '# Memory report',
        '',
        f"{'CPU' if cpu else 'CUDA'} ({env['device_name']}), "
        f"{env['precision']}, {size}, batch {s['batch']}, "
        f"{s['steps']} timed steps after {s['warmup']} warm-up; torch {env['torch']}, "
        f"mmseg {env['mmseg']}, {env['torch_threads']} threads, Mesa kernels: "
        f"{env['mesa_backend']}; {report['date']}.",
        '',
        'Reproduce:',
        '',
        '```',
        report['command'],
        '```',
        '',
    ]
    lines += main_table(results, baseline, budget)
    peak_how = ('bytes of live CPU tensors at the step\'s peak, from the allocator\'s '
                'own events (`torch.profiler`, `profile_memory=True`), weights, '
                'gradients and optimizer state included' if cpu else
                '`torch.cuda.max_memory_allocated` over the timed steps, reset after '
                'the warm-up')
    lines += [
        '',
        "- **loss, checkpointing, precision**: read from each built model: "
        "'fused resize + CE' = the exact fused resize + cross-entropy (only the "
        "low-resolution logits kept for backward; under Mesa kept in 8 bits, so "
        "the loss is exact and its gradient Mesa's approximation), \"mmseg's CE\" = "
        "mmseg's upsample-then-cross-entropy; checkpointing of the backbone blocks "
        '(`with_cp`); the optimizer wrapper\'s precision. A comparison changes one '
        'thing: to see what Mesa itself saves, measure against a baseline with the '
        'same loss function (`--strategy mesa --baseline-strategy fused_loss`);',
        f'- **peak training memory**: {peak_how};',
        '- **activation memory**: bytes autograd keeps for backward at the end of the '
        'forward + loss (unique storages, parameters excluded, '
        '`mesa_seg.mesa.audit_saved_tensors`);',
        '- **step time**: median of the timed steps (forward, backward, optimizer step);',
    ]
    if cpu:
        lines += ['- **CPU time**: median CPU seconds per step, all threads of the process '
                  '(less affected than wall time by other jobs on a shared machine);',
                  '- **peak RSS**: the process\'s peak resident memory during the timed '
                  'steps (Python and libraries included);']
    if budget is not None:
        lines.append(f"- **max batch**: largest batch whose peak training memory is at most "
                     f"{budget / MiB:,.0f} MiB ({s['budget_source']}), probed in fresh "
                     'processes; "≥" where the search stopped before the boundary.')
    lines += ['', '## Peak training memory: what is resident, what a step adds (MiB)', '',
              'At step start: weights, optimizer state, buffers and the batch (gradients '
              'are freed by the previous step). Added by the step: activations kept for '
              'backward, gradients, temporaries. Peak reached in: the profiler events '
              '(backward node, op) running when the CPU allocator peaked.', '']
    lines += composition_table(results)
    lines += ['', '## Activation memory by part (MiB)', '']
    lines += part_table(results)
    lines += ['', '## Activation memory by op (MiB)', '',
              'The op that saved the tensor (a Mesa layer saves its 8-bit input under '
              'its own name).', '']
    lines += op_table(results)
    for r in results:
        if r.get('activation') and r['activation']['largest']:
            lines += ['', f"## Largest full-precision saved tensors: {r['name']}", '']
            lines += largest_table(r)
    if cpu:
        lines += ['', '## Cross-check: allocator events vs RSS', '',
                  'Growth over one training step, measured two independent ways '
                  '(that step, after the timed ones, runs with glibc `mallopt` ' +
                  ' '.join(f'{k}={v}' for k, v in env['rss_malloc'].items()) +
                  ' so freed tensors return to the kernel).', '']
        lines += crosscheck_table(results)
    lines.append('')
    with open(path, 'w') as f:
        f.write('\n'.join(lines))


def ensure_dir(path: str) -> str:
    os.makedirs(path, exist_ok=True)
    return path
