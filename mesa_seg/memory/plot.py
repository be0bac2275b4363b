"""``report.png``: activation memory by part, peak memory, step time, max batch."""
from __future__ import annotations

from typing import Dict, List

from .breakdown import part_sort_key

__all__ = ['plot_report']

MiB = 1024 ** 2

_FIXED_COLORS = {
    'neck': '#8e6bbf',
    'decode_head': '#f28e2b',
    'auxiliary_head': '#edc948',
    'loss': '#e15759',
    'other': '#9d9d9d',
}


def _part_colors(parts: List[str]) -> Dict[str, str]:
    """Backbone parts in shades of blue (stem lightest), heads warm, loss red."""
    from matplotlib import colormaps
    backbone = [p for p in parts if p.startswith('backbone.')]
    blues = colormaps['Blues']
    colors = {p: blues(0.35 + 0.55 * i / max(1, len(backbone) - 1))
              for i, p in enumerate(backbone)}
    colors.update({p: _FIXED_COLORS.get(p, '#9d9d9d') for p in parts if p not in colors})
    return colors


def _wrap(name: str, width: int = 14) -> str:
    words, lines, line = name.split('_'), [], ''
    for w in words:
        cand = f'{line}_{w}' if line else w
        if len(cand) > width and line:
            lines.append(line + '_')
            line = w
        else:
            line = cand
    return '\n'.join(lines + [line])


def _label_bars(ax, xs, tops, texts, ymax):
    for x, top, text in zip(xs, tops, texts):
        ax.text(x, top + 0.015 * ymax, text, ha='center', va='bottom', fontsize=8.5)


def _ratio(r: Dict, key: str, baseline: bool) -> str:
    q = r['ratios'].get(key)
    return 'baseline' if baseline else ('' if q is None else f'{q:.2f}×')


def plot_report(report: Dict, path: str) -> None:
    """Write the report figure to ``path`` (matplotlib, Agg backend)."""
    import matplotlib
    matplotlib.use('Agg')
    from matplotlib import pyplot as plt
    from matplotlib.patches import Patch

    results = [r for r in report['results'] if not r.get('oom')]
    base = report['baseline']
    names = [_wrap(r['name']) for r in results]
    is_base = [r['name'] == base for r in results]
    xs = list(range(len(results)))
    sweep = any(r.get('sweep') for r in results)
    panels = 4 if sweep else 3
    fig, axes = plt.subplots(1, panels, figsize=(3.4 * panels + 1.4, 6.2),
                             gridspec_kw=dict(width_ratios=[1.3] + [1] * (panels - 1)),
                             layout='constrained')
    width = 0.62

    # 1. activation memory by part: solid = full precision, hatched = 8-bit
    ax = axes[0]
    def part_mib(r, p):
        cell = r['activation']['by_part'].get(p, {})
        return (cell.get('compressed', 0) + cell.get('uncompressed', 0)) / MiB

    top = max(r['activation']['total'] for r in results) / MiB
    # parts too small to see (e.g. a few bytes on the root) stay out of the legend
    parts = sorted({p for r in results for p in r['activation']['by_part']
                    if part_mib(r, p) > 1e-3 * top}, key=part_sort_key)
    colors = _part_colors(parts)
    bottoms = [0.0] * len(results)
    for p in parts:
        for kind, hatch in (('uncompressed', None), ('compressed', '///')):
            h = [r['activation']['by_part'].get(p, {}).get(kind, 0) / MiB for r in results]
            if any(h):
                ax.bar(xs, h, width, bottom=bottoms, color=colors[p], hatch=hatch,
                       hatchcolor=(1, 1, 1, 0.75), hatch_linewidth=1.2,
                       edgecolor='white', linewidth=0.6)
                bottoms = [b + v for b, v in zip(bottoms, h)]
    ymax = max(bottoms) or 1
    _label_bars(ax, xs, bottoms, [f'{t:,.0f}\n{_ratio(r, "activation", b)}'
                                  for t, r, b in zip(bottoms, results, is_base)], ymax)
    ax.set_title('Activation memory kept for backward', fontsize=10.5)
    ax.set_ylabel('MiB')
    handles = [Patch(color=colors[p], label=p.replace('backbone.', 'backbone ')) for p in parts]
    handles.append(Patch(facecolor='#9d9d9d', edgecolor='white', hatch='///',
                         hatchcolor=(1, 1, 1, 0.75), label='hatched: stored in 8 bits'))
    ax.legend(handles=handles, fontsize=7.5, loc='upper center', bbox_to_anchor=(0.5, -0.16),
              ncol=3, frameon=False)

    # 2. peak training memory: resident at step start + what the step adds
    ax = axes[1]
    start = [r['step_start'] / MiB for r in results]
    extra = [(r['peak'] - r['step_start']) / MiB for r in results]
    ax.bar(xs, start, width, color='#bab0ac', label='at step start\n(weights, optimizer state)')
    ax.bar(xs, extra, width, bottom=start, color='#4e79a7',
           label='added by the step\n(activations, gradients)')
    tops = [a + b for a, b in zip(start, extra)]
    _label_bars(ax, xs, tops, [f'{t:,.0f}\n{_ratio(r, "peak", b)}'
                               for t, r, b in zip(tops, results, is_base)], max(tops) or 1)
    ax.set_title('Peak training memory', fontsize=10.5)
    ax.set_ylabel('MiB')
    ax.legend(fontsize=7.5, loc='upper center', bbox_to_anchor=(0.5, -0.16), frameon=False)

    # 3. step time
    ax = axes[2]
    times = [r['step_time']['median'] for r in results]
    ax.bar(xs, times, width, color='#76b7b2')
    _label_bars(ax, xs, times, [f'{t:.2f}\n{_ratio(r, "step_time", b)}'
                                for t, r, b in zip(times, results, is_base)], max(times) or 1)
    ax.set_title('Step time (median, wall clock)', fontsize=10.5)
    ax.set_ylabel('s')

    # 4. largest batch under the budget
    if sweep:
        ax = axes[3]
        mb = [(r.get('sweep') or {}).get('max_batch', 0) for r in results]
        ax.bar(xs, mb, width, color='#59a14f')
        _label_bars(ax, xs, mb, [
            f"{'' if (r.get('sweep') or {}).get('exact', True) else '≥'}{m}\n"
            f"{_ratio(r, 'max_batch', b)}" for m, r, b in zip(mb, results, is_base)],
            max(mb) or 1)
        budget = report['settings']['budget'] / MiB
        ax.set_title(f'Max batch, peak ≤ {budget:,.0f} MiB', fontsize=10.5)
        ax.set_ylabel('images per step')

    for ax in axes:
        ax.set_xticks(xs, names, fontsize=8.5)
        ax.spines[['top', 'right']].set_visible(False)
        ax.set_ylim(0, ax.get_ylim()[1] * 1.22)  # room for the labels
        ax.grid(axis='y', color='#e6e6e6', linewidth=0.7)
        ax.set_axisbelow(True)
    env, s = report['environment'], report['settings']
    size = 'x'.join(str(x) for x in results[0]['size']) if results else ''
    cpu = s['device'] == 'cpu'
    fig.suptitle(f"mesa-seg memory report — {'CPU' if cpu else 'CUDA'} ({env['device_name']}), "
                 f"{env['precision']}, {size}, batch {s['batch']}, torch {env['torch']}",
                 fontsize=12, x=0.01, ha='left')
    peak_how = ("the CPU allocator's peak of live tensor bytes" if cpu else
                'torch.cuda.max_memory_allocated')
    # a figure-level label gets its own room in the constrained layout
    fig.supxlabel('Activation memory: bytes autograd keeps for backward after the '
                  f'forward + loss.\nPeak: {peak_how} during a training step (forward, '
                  f'backward, optimizer step). Ratios are to {report["baseline"]}.',
                  fontsize=8, color='#555555', x=0.01, ha='left')
    fig.get_layout_engine().set(h_pad=0.12)
    fig.savefig(path, dpi=150)
    plt.close(fig)
