"""The largest batch that fits a memory budget, with few (expensive) probes.

Peak training memory is close to affine in the batch size: a fixed part
(weights, gradients, optimizer state) plus a per-image part (activations).
Each probe's guess is the affine fit's prediction through the points measured
so far; when it falls outside the bracket ``(largest fitting, smallest not
fitting)`` the search bisects the bracket instead. The search ends
when the bracket closes (the answer is exact) or after ``max_probes``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

__all__ = ['SweepResult', 'largest_batch']


@dataclass
class SweepResult:
    """``max_batch``: largest batch measured to fit (0 if none);
    ``exact``: ``max_batch + 1`` was measured not to fit (or ``max_batch`` is the
    cap); ``peaks``: every batch measured and its peak bytes (None = out of
    memory); ``probes``: the batches probed here, in order."""
    max_batch: int
    exact: bool
    peaks: Dict[int, Optional[int]]
    probes: List[int] = field(default_factory=list)


def _fits(peak: Optional[int], budget: float) -> bool:
    return peak is not None and peak <= budget


def _predict(peaks: Dict[int, Optional[int]], budget: float, fixed: Optional[float]) -> int:
    pts = sorted((b, p) for b, p in peaks.items() if p is not None)
    if len(pts) >= 2:
        # Affine through the two points nearest the budget (peaks grow with batch).
        (b0, p0), (b1, p1) = sorted(pts, key=lambda bp: abs(bp[1] - budget))[:2]
        if b0 != b1 and p1 != p0:
            slope = (p1 - p0) / (b1 - b0)
            if slope > 0:
                return math.floor(b0 + (budget - p0) / slope)
    if pts:
        b, p = pts[-1]
        base = fixed if fixed is not None and fixed < p else 0.0
        return math.floor(b * (budget - base) / (p - base)) if p > base else 2 * b
    return 1


def largest_batch(probe: Callable[[int], Optional[int]], budget: float,
                  known: Optional[Dict[int, Optional[int]]] = None,
                  fixed: Optional[float] = None, max_batch: int = 256,
                  max_probes: int = 8) -> SweepResult:
    """Largest batch ``b <= max_batch`` with ``probe(b) <= budget``.

    Args:
        probe (callable): ``probe(batch)`` -> peak bytes, or None when the step
            ran out of memory.
        budget (float): bytes.
        known (dict, optional): peaks already measured ``{batch: bytes}``.
            Default: None.
        fixed (float, optional): the batch-independent bytes (e.g. memory at the
            start of a step), for the first guess from a single point. Default: None.
        max_batch (int): cap. Default: 256.
        max_probes (int): at most this many calls to ``probe``. Default: 8.
    """
    peaks: Dict[int, Optional[int]] = dict(known or {})
    probes: List[int] = []

    def bracket():
        fit = [b for b, p in peaks.items() if _fits(p, budget)]
        over = [b for b, p in peaks.items() if not _fits(p, budget)]
        return max(fit, default=0), min(over, default=None)

    lo, hi = bracket()
    while len(probes) < max_probes:
        top = max_batch if hi is None else min(hi - 1, max_batch)
        if lo >= top:
            break
        guess = _predict(peaks, budget, fixed)
        if not lo < guess <= top:
            # Outside the bracket the fit is not to be trusted: bisect when
            # there is a bracket, else step just past the largest fitting batch.
            guess = (lo + hi) // 2 if hi is not None and hi <= max_batch else \
                min(max(guess, lo + 1), top)
        peaks[guess] = probe(guess)
        probes.append(guess)
        lo, hi = bracket()
    exact = (hi is not None and hi == lo + 1) or lo >= max_batch
    return SweepResult(max_batch=lo, exact=exact, peaks=peaks, probes=probes)
