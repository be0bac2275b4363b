"""``pareto_<model>.png``: peak memory vs step time per strategy, with the
Pareto front, next to the activation memory of each strategy by model part.

Labels are placed greedily: each goes to the nearest free spot of a ring of
candidate positions around its point (growing radius), never over another
label or another point, with a leader line when it had to move away.
"""
from __future__ import annotations

import math
import re
from typing import Dict, List, Optional, Sequence, Tuple

from ..memory.breakdown import part_sort_key
from ..memory.plot import _part_colors
from .cells import REFERENCE

__all__ = ['plot_model', 'plot_file_name', 'place_labels']

_COLORS = {
    'fp32': '#555555', 'fused_loss': '#4e79a7', 'amp': '#f28e2b', 'cp': '#59a14f',
    'sac': '#8cd17d', 'mesa': '#e15759', 'mesa_amp': '#b07aa1', 'mesa_cp': '#9c755f',
}
_DPI = 150
Box = Tuple[float, float, float, float]  # x0, y0, x1, y1 in display pixels


def plot_file_name(model: str) -> str:
    return 'pareto_' + re.sub(r'[^\w.-]+', '_', model).strip('_') + '.png'


def _overlap(a: Box, b: Box) -> float:
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    return w * h if w > 0 and h > 0 else 0.0


def place_labels(points: Sequence[Tuple[float, float]], sizes: Sequence[Tuple[float, float]],
                 bounds: Box, marker: float = 7.0, pad: float = 2.0,
                 obstacles: Sequence[Box] = ()) -> List[Tuple[float, float, str, str, bool]]:
    """Positions for one label per point, in display pixels.

    Args:
        points: the points ``(x, y)``.
        sizes: each label's ``(width, height)``.
        bounds: where labels must stay ``(x0, y0, x1, y1)``.
        marker: radius kept free around every point.
        pad: gap kept between labels.
        obstacles: more boxes to keep labels off (e.g. lines).

    Returns:
        list: per point ``(x, y, ha, va, far)``: the label's anchor, its
        alignment and whether it moved away far enough to need a leader line.
    """
    placed: List[Box] = []
    keep_out = [(x - marker, y - marker, x + marker, y + marker) for x, y in points]
    keep_out += list(obstacles)
    out: List[Optional[Tuple[float, float, str, str, bool]]] = [None] * len(points)
    # the most crowded points choose first
    crowd = [sum(math.hypot(x - u, y - v) < 60 for u, v in points) for x, y in points]
    order = sorted(range(len(points)), key=lambda i: -crowd[i])
    angles = [0, 45, -45, 90, -90, 135, -135, 180, 22.5, -22.5, 157.5, -157.5,
              67.5, -67.5, 112.5, -112.5]
    for i in order:
        (x, y), (w, h) = points[i], sizes[i]
        best, best_cost = None, math.inf
        for radius in (9, 16, 26, 38, 52, 70, 95, 125, 160):
            for a in angles:
                dx, dy = radius * math.cos(math.radians(a)), radius * math.sin(math.radians(a))
                ax, ay = x + dx, y + dy
                ha = 'left' if dx > 0.3 * radius else ('right' if dx < -0.3 * radius
                                                          else 'center')
                va = 'bottom' if dy > 0.3 * radius else ('top' if dy < -0.3 * radius
                                                          else 'center')
                x0 = ax if ha == 'left' else (ax - w if ha == 'right' else ax - w / 2)
                y0 = ay if va == 'bottom' else (ay - h if va == 'top' else ay - h / 2)
                box = (x0 - pad, y0 - pad, x0 + w + pad, y0 + h + pad)
                cost = sum(_overlap(box, b) for b in placed)
                cost += sum(_overlap(box, b) for b in keep_out)
                outside = max(0, bounds[0] - box[0]) + max(0, box[2] - bounds[2]) + \
                    max(0, bounds[1] - box[1]) + max(0, box[3] - bounds[3])
                cost += 1e3 * outside
                if cost == 0:
                    best, best_cost = (ax, ay, ha, va, radius > 16, box), 0
                    break
                if cost + radius < best_cost:  # fallback: least overlap
                    best, best_cost = (ax, ay, ha, va, True, box), cost + radius
            if best_cost == 0:
                break
        placed.append(best[5])
        out[i] = best[:5]
    return out  # type: ignore[return-value]


def _segments(ax, line: Sequence[Tuple[float, float]], width: float = 1.5) -> List[Box]:
    """Thin boxes around the horizontal/vertical segments of a staircase."""
    pts = [tuple(p) for p in ax.transData.transform(line)] if line else []
    return [(min(a[0], b[0]) - width, min(a[1], b[1]) - width,
             max(a[0], b[0]) + width, max(a[1], b[1]) + width) for a, b in zip(pts, pts[1:])]


def _staircase(pts: Sequence[Tuple[float, float]]) -> List[Tuple[float, float]]:
    """The corners of ``drawstyle='steps-post'`` through ``pts``."""
    out: List[Tuple[float, float]] = []
    for (x0, y0), (x1, _) in zip(pts, pts[1:]):
        out += [(x0, y0), (x1, y0)]
    return out + list(pts[-1:])


def _fmt_mib(x: float) -> str:
    return f'{x:,.0f}' if x >= 100 else f'{x:.1f}'


def _label_points(ax, fig, xs, ys, names, bold, line=()):
    """Draw the labels of the scatter without overlaps (see :func:`place_labels`)."""
    renderer = fig.canvas.get_renderer()
    sizes = []
    for name, b in zip(names, bold):
        t = ax.text(0, 0, name, fontsize=8.5, fontweight='bold' if b else 'normal')
        bb = t.get_window_extent(renderer)
        sizes.append((bb.width, bb.height))
        t.remove()
    pts = [tuple(p) for p in ax.transData.transform(list(zip(xs, ys)))]
    box = ax.get_window_extent(renderer)
    spots = place_labels(pts, sizes, (box.x0, box.y0, box.x1, box.y1),
                         obstacles=_segments(ax, list(line)))
    to_points = 72.0 / fig.dpi
    for (px, py), (lx, ly, ha, va, far), name, x, y, b in zip(pts, spots, names, xs, ys,
                                                                bold):
        label = ax.annotate(
            name, (x, y), xytext=((lx - px) * to_points, (ly - py) * to_points),
            textcoords='offset points', ha=ha, va=va, fontsize=8.5,
            fontweight='bold' if b else 'normal',
            arrowprops=dict(arrowstyle='-', color='#999999', lw=0.6, shrinkA=0,
                            shrinkB=4) if far else None)
        label.set_in_layout(False)  # placed inside the axes: the layout stays as measured


def plot_model(board: Dict, model: str, path: str) -> None:
    """Write ``model``'s figure (matplotlib, Agg backend) to ``path``."""
    import matplotlib
    matplotlib.use('Agg')
    from matplotlib import pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    rows = [r for r in board['rows'] if r['model'] == model]
    ok = [r for r in rows if not r.get('error') and not r.get('skipped')
          and r.get('peak_mib') is not None and r.get('step_s') is not None]
    front = set(board['summary'][model]['pareto_front'])
    s = board['settings']
    fig, (left, right) = plt.subplots(1, 2, figsize=(13.5, 5.8), dpi=_DPI,
                                      gridspec_kw=dict(width_ratios=[1.15, 1]),
                                      layout='constrained')

    # left: peak vs step time, Pareto front as a staircase
    xs = [r['peak_mib'] for r in ok]
    ys = [r['step_s'] for r in ok]
    for r in ok:
        on = r['strategy'] in front
        left.scatter(r['peak_mib'], r['step_s'], s=60 if on else 38, zorder=3,
                     color=_COLORS.get(r['strategy'], '#333333'),
                     edgecolor='black' if on else 'white', linewidth=1.0)
    pts = sorted((r['peak_mib'], r['step_s']) for r in ok if r['strategy'] in front)
    if len(pts) > 1:
        left.plot([p[0] for p in pts], [p[1] for p in pts], drawstyle='steps-post',
                  color='#444444', lw=1.1, ls='--', zorder=2)
    if xs:
        span_x = (max(xs) - min(xs)) or max(xs) or 1.0
        span_y = (max(ys) - min(ys)) or max(ys) or 1.0
        left.set_xlim(max(0, min(xs) - 0.25 * span_x), max(xs) + 0.25 * span_x)
        left.set_ylim(max(0, min(ys) - 0.3 * span_y), max(ys) + 0.3 * span_y)
    left.set_xlabel('peak training memory, MiB' + (' (max_memory_allocated)'
                                                    if s['device'] == 'cuda' else ''))
    left.set_ylabel('step time, s (median)')
    left.set_title('Peak memory vs step time (lower left is better)', fontsize=10.5)
    left.grid(color='#e6e6e6', linewidth=0.7)
    left.set_axisbelow(True)
    left.spines[['top', 'right']].set_visible(False)
    left.legend(handles=[Line2D([], [], color='#444444', ls='--', lw=1.1,
                                label='Pareto front (bold: on it)')],
                fontsize=8, loc='upper right', frameon=False)
    fig.canvas.draw()  # final limits and layout before measuring label positions
    _label_points(left, fig, xs, ys, [r['strategy'] for r in ok],
                  [r['strategy'] in front for r in ok], _staircase(pts))

    # right: activation memory by part, stacked
    bars = [r for r in rows if not r.get('error') and not r.get('skipped')
            and r.get('activation_by_part')]
    top_total = max((r['activation_mib'] or 0 for r in bars), default=0)
    # parts too small to see (a few bytes on the root) stay out of the legend
    parts = sorted({p for r in bars for p, v in r['activation_by_part'].items()
                    if (v or 0) > 1e-3 * top_total}, key=part_sort_key)
    colors = _part_colors(parts)
    bx = list(range(len(bars)))
    bottoms = [0.0] * len(bars)
    for p in parts:
        h = [r['activation_by_part'].get(p) or 0.0 for r in bars]
        if any(h):
            right.bar(bx, h, 0.66, bottom=bottoms, color=colors[p], edgecolor='white',
                      linewidth=0.5)
            bottoms = [b + v for b, v in zip(bottoms, h)]
    top = max(bottoms, default=0) or 1.0
    for x, r, b in zip(bx, bars, bottoms):
        q = (r.get('ratios') or {}).get('activation')
        text = _fmt_mib(r['activation_mib']) + (
            '\nref.' if r['strategy'] == REFERENCE else ('' if q is None else f'\n{q:.2f}×'))
        right.text(x, b + 0.015 * top, text, ha='center', va='bottom', fontsize=8)
    right.set_xticks(bx, [r['strategy'] for r in bars], rotation=30, ha='right',
                     fontsize=8.5)
    right.set_ylim(0, top * 1.2)
    right.set_ylabel('MiB')
    right.set_title('Activation memory kept for backward, by part', fontsize=10.5)
    right.grid(axis='y', color='#e6e6e6', linewidth=0.7)
    right.set_axisbelow(True)
    right.spines[['top', 'right']].set_visible(False)
    right.legend(handles=[Patch(color=colors[p], label=p.replace('backbone.', 'backbone '))
                          for p in parts], fontsize=7.5, loc='upper center', frameon=False,
                 ncol=5, bbox_to_anchor=(0.5, -0.2))

    m = board['machine']
    size = 'x'.join(str(x) for x in s['size']) if s.get('size') else 'crop size'
    failed = [r['strategy'] for r in rows if r.get('error') or r.get('skipped')]
    fig.suptitle(f"{model}: strategies, {'CPU' if s['device'] == 'cpu' else 'CUDA'} "
                 f"({m['device_name']}), {size}, batch {s['batch']}, torch {m['torch']}",
                 fontsize=12, x=0.01, ha='left')
    note = ('Each strategy in a fresh process, same initial weights, batch and seed. '
            'Ratios are to fp32.')
    if failed:
        note += ' Failed or skipped (not shown): ' + ', '.join(failed) + \
            ' (see leaderboard.md).'
    fig.supxlabel(note, fontsize=8, color='#555555', x=0.01, ha='left')
    fig.savefig(path, dpi=_DPI)
    plt.close(fig)
