"""Training-memory measurement: the logic behind ``tools/memory_report.py``.

``meters`` (CPU allocator events, RSS), ``breakdown`` (activation memory by
model part and op, on top of :func:`mesa_seg.mesa.audit_saved_tensors`),
``measure`` (one config, in the current process), ``worker`` (one config per
fresh process), ``sweep`` (largest batch under a budget), ``report`` and
``plot`` (report.md/json/png), ``cli`` (the tool).
"""
from .breakdown import PartMapper, activation_breakdown, method_scopes
from .measure import RunSpec, measure
from .meters import CPUAllocatorTrace, peak_rss_bytes, reset_peak_rss, rss_bytes
from .sweep import SweepResult, largest_batch

__all__ = [
    'PartMapper', 'activation_breakdown', 'method_scopes', 'RunSpec', 'measure',
    'CPUAllocatorTrace', 'peak_rss_bytes', 'reset_peak_rss', 'rss_bytes', 'SweepResult',
    'largest_batch'
]
