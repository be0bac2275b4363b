"""The strategy benchmark behind ``tools/benchmark.py``: every memory-saving
strategy (:mod:`mesa_seg.strategies`) on every model, one fresh process per
cell, written up as a leaderboard.

``cells`` (what one cell measures and the row it becomes), ``leaderboard``
(ratios to fp32, Pareto front, Mesa's own saving, ``leaderboard.{json,md}``),
``plot`` (``pareto_<model>.png``), ``cli`` (the tool). The measurement itself
is :mod:`mesa_seg.memory`'s. ``ops`` is the per-op cost of Mesa vs torch
(``python -m mesa_seg.benchmark.ops``, ``make bench-ops``).
"""
