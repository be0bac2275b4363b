"""One cell of the leaderboard: a model trained with one strategy.

Every cell of a model starts from the same weights, batch and seed: the
model's ``fp32`` cell (measured first) writes its initial weights and what its
first training step computed (gradients, decode-head output) to a scratch
folder; every other cell loads those weights before its first step and
compares its own first step with the reference there, so only numbers come
back (:func:`mesa_seg.memory.measure.compare_captures`).
"""
from __future__ import annotations

import os.path as osp
import re
from dataclasses import dataclass
from typing import Dict, Optional

from ..memory.measure import RunSpec
from ..strategies import describe

__all__ = ['REFERENCE', 'MiB', 'Cell', 'cell_spec', 'result_row', 'failed_row', 'skipped_row',
           'ROW_KEYS']

#: the strategy every ratio and comparison refers to
REFERENCE = 'fp32'
MiB = 1024 ** 2

#: every row of ``leaderboard.json`` has exactly these keys
ROW_KEYS = (
    'model', 'config', 'strategy', 'reference', 'includes', 'loss', 'checkpointing',
    'precision', 'segmentor', 'backbone', 'mesa_layers', 'peak_mib', 'peak_reserved_mib',
    'step_start_mib', 'activation_mib', 'activation_8bit_mib', 'activation_by_part',
    'step_s', 'step_cpu_s', 'max_batch', 'max_batch_exact', 'grad_cosine', 'grad_exact',
    'forward_exact', 'forward_dtype', 'forward_max_abs_diff', 'same_initial_weights',
    'mesa_backend', 'mesa_compile_failed', 'ratios', 'error', 'sweep_error', 'skipped', 'log')


@dataclass(frozen=True)
class Cell:
    """``model``: the model's short name; ``config``: its config file;
    ``strategy``: a :data:`mesa_seg.strategies.STRATEGIES` name."""
    model: str
    config: str
    strategy: str

    @property
    def tag(self) -> str:
        """A file-name-safe ``<model>_<strategy>``."""
        return re.sub(r'[^\w.-]+', '_', f'{self.model}_{self.strategy}').strip('_')

    @property
    def is_reference(self) -> bool:
        return self.strategy == REFERENCE


def _scratch(folder: str, cell: Cell, what: str) -> str:
    model = re.sub(r'[^\w.-]+', '_', cell.model)
    return osp.join(folder, f'{model}.{what}.pt')


def cell_spec(cell: Cell, scratch: str, **common) -> RunSpec:
    """The :class:`~mesa_seg.memory.measure.RunSpec` of ``cell``: the reference
    cell writes the initial weights and its first step's capture to
    ``scratch``; the others read them from there when they exist (they do not
    when the reference cell failed before writing them)."""
    weights = _scratch(scratch, cell, 'init_weights')
    reference = _scratch(scratch, cell, f'capture_{REFERENCE}')
    if cell.is_reference:
        return RunSpec(config=cell.config, strategy=cell.strategy, weights_out=weights,
                       capture_out=reference, **common)
    return RunSpec(config=cell.config, strategy=cell.strategy,
                   weights_in=weights if osp.isfile(weights) else None,
                   compare_to=reference if osp.isfile(reference) else None, **common)


def _mib(x: Optional[float]) -> Optional[float]:
    return None if x is None else x / MiB


def _empty_row(cell: Cell, log: Optional[str]) -> Dict:
    row = dict.fromkeys(ROW_KEYS)
    d = describe(cell.strategy)
    row.update(model=cell.model, config=cell.config, strategy=cell.strategy,
               reference=cell.is_reference, includes=d, log=log, ratios={})
    return row


def result_row(cell: Cell, result: Dict, log: Optional[str] = None) -> Dict:
    """The leaderboard row of a measurement (:func:`~mesa_seg.memory.measure.measure`
    result): MiB, seconds, the built model's loss/checkpointing/precision, and
    the comparison with the reference cell (the reference's own row says
    ``reference: true``: its cosine 1.0 and exact forward hold by definition)."""
    row = _empty_row(cell, log)
    if result.get('oom'):
        row['error'] = f"out of memory at batch {result['spec']['batch']}"
        return row
    m = result.get('model') or {}
    act = result.get('activation') or {}
    row.update(
        loss=m.get('loss'), checkpointing=m.get('checkpointing'),
        precision=m.get('precision'), segmentor=m.get('segmentor'),
        backbone=m.get('backbone'), mesa_layers=m.get('mesa_layers'),
        peak_mib=_mib(result.get('peak')), peak_reserved_mib=_mib(result.get('peak_reserved')),
        step_start_mib=_mib(result.get('step_start')),
        activation_mib=_mib(act.get('total')), activation_8bit_mib=_mib(act.get('compressed')),
        activation_by_part={p: _mib(c['compressed'] + c['uncompressed'])
                            for p, c in (act.get('by_part') or {}).items()} or None,
        step_s=(result.get('step_time') or {}).get('median'),
        step_cpu_s=(result.get('step_cpu_time') or {}).get('median'),
        mesa_backend=result.get('mesa_backend'),
        mesa_compile_failed=result.get('mesa_compile_failed'))
    if cell.is_reference:
        row.update(grad_cosine=1.0, grad_exact=True, forward_exact=True,
                   same_initial_weights=True, forward_max_abs_diff=0.0)
    else:
        row.update(grad_cosine=result.get('grad_cosine'), grad_exact=result.get('grad_exact'),
                   forward_exact=result.get('forward_exact'),
                   forward_dtype=result.get('forward_dtype'),
                   forward_max_abs_diff=result.get('forward_max_abs_diff'),
                   same_initial_weights='weights' in result)
    return row


def failed_row(cell: Cell, error: str, log: Optional[str] = None) -> Dict:
    """The row of a cell that did not finish: ``error`` is one line."""
    row = _empty_row(cell, log)
    row['error'] = error
    return row


def skipped_row(cell: Cell, reason: str) -> Dict:
    """The row of a cell not measured on purpose: ``reason`` is one line."""
    row = _empty_row(cell, None)
    row['skipped'] = reason
    return row
