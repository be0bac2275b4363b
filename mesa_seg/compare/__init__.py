"""Convergence of Mesa vs full precision: the logic behind
``tools/compare_training.py``.

``runs`` (train every variant in a fresh process from the same initial
weights, seed, data and scaled schedule), ``reading`` (per-iteration losses
and validation metrics read back, moving average, summary), ``report`` and
``plot`` (report.md/json/png, with the machine description of
:func:`mesa_seg.machine.describe_machine`), ``cli`` (the tool).
"""
from .cli import main
from .reading import SMOOTH, moving_average, read_run, summarize
from .report import write_report
from .runs import compare, write_initial_weights

__all__ = [
    'read_run', 'moving_average', 'summarize', 'write_report', 'compare',
    'write_initial_weights', 'main', 'SMOOTH'
]
