"""Memory meters: the CPU allocator's own events, process RSS, CUDA peaks.

* :class:`CPUAllocatorTrace` — every CPU tensor allocation and free, as the
  allocator reports them to ``torch.profiler`` (``profile_memory=True``).
  The running sum of those events is the bytes of live CPU tensors; its
  maximum over a window is the peak, exactly what ``max_memory_allocated``
  is on CUDA. Expensive (the profiler records every op): for measurement
  runs, never in training.
* :func:`rss_bytes` / :func:`peak_rss_bytes` / :func:`reset_peak_rss` — the
  kernel's view of the process (``/proc/self/status``), cheap, independent of
  torch.
"""
from __future__ import annotations

import contextlib
import ctypes
import resource
import sys
from bisect import bisect_left, bisect_right
from itertools import accumulate
from typing import Dict, Iterator, List, Optional, Tuple

from torch.profiler import ProfilerActivity, profile, record_function

__all__ = ['CPUAllocatorTrace', 'rss_bytes', 'peak_rss_bytes', 'reset_peak_rss',
           'trim_heap', 'RSS_MALLOC', 'malloc_for_rss']

MiB = 1024 ** 2

#: glibc settings for the step whose RSS is read: allocations above 64 KiB get
#: their own mmap and go back to the kernel when freed, so the process RSS
#: follows the live tensor bytes (with glibc's default dynamic threshold, freed
#: tensors stay in the heap and RSS grows 2-3x more than the allocator's
#: figure). Not for timed steps: an mmap and page faults for every such
#: allocation slow a step, most where it allocates most often (Mesa), and
#: training runs with glibc's defaults.
RSS_MALLOC = {'M_MMAP_THRESHOLD': 65536, 'M_TRIM_THRESHOLD': 0}
_MALLOPT_PARAM = {'M_TRIM_THRESHOLD': -1, 'M_MMAP_THRESHOLD': -3}


def malloc_for_rss() -> bool:
    """Apply :data:`RSS_MALLOC` to this process (glibc ``mallopt``), for good:
    call it after the timed steps. Returns False without glibc."""
    try:
        libc = ctypes.CDLL(None)
        return all(libc.mallopt(_MALLOPT_PARAM[k], v) == 1 for k, v in RSS_MALLOC.items())
    except (OSError, AttributeError):
        return False


_STATUS = '/proc/self/status'


def _status_kib(field: str) -> Optional[int]:
    try:
        with open(_STATUS) as f:
            for line in f:
                if line.startswith(field + ':'):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def rss_bytes() -> int:
    """Resident set size of this process now (0 where /proc is missing)."""
    kib = _status_kib('VmRSS')
    return 0 if kib is None else kib * 1024


def peak_rss_bytes() -> int:
    """Peak resident set size since the last :func:`reset_peak_rss` (or since
    the process started when the kernel cannot reset it)."""
    kib = _status_kib('VmHWM')
    if kib is not None:
        return kib * 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == 'darwin' else peak * 1024  # bytes on macOS


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark to the current RSS (Linux >= 4.0:
    ``echo 5 > /proc/self/clear_refs``). Returns False where unsupported."""
    try:
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')
        return True
    except OSError:
        return False


def trim_heap() -> bool:
    """Return the free pages of the malloc heap to the kernel (glibc's
    ``malloc_trim``). Large freed heap chunks (e.g. the profiler's event
    buffers) are otherwise reused by later tensors without any page fault, and
    RSS growth then misses those tensors. Returns False without glibc."""
    try:
        return bool(ctypes.CDLL(None).malloc_trim(0))
    except (OSError, AttributeError):
        return False


class CPUAllocatorTrace:
    """Records the CPU allocator's events; windows mark the spans of interest.

    The *level* is the running sum of allocation (+) and free (-) events since
    the trace started: the bytes of CPU tensors allocated since then and still
    live. Tensors allocated before the trace are not seen, so start a trace
    before the model is built to get absolute levels::

        with CPUAllocatorTrace() as trace:
            model = build()
            with trace.window('step'):
                train_step()
        start, peak = trace.levels('step')
    """

    def __init__(self):
        self._prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True,
                             record_shapes=False, with_stack=False)
        self._names: List[str] = []
        self._levels: Dict[str, Tuple[int, int]] = {}
        self._peak_ops: Dict[str, List[str]] = {}
        self.end_level: Optional[int] = None  #: the level when the trace ended

    def __enter__(self) -> 'CPUAllocatorTrace':
        self._prof.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._prof.__exit__(*exc)
        if exc[0] is None:
            self._summarize()
        self._prof = None  # the recorded events take tens of MB

    @contextlib.contextmanager
    def window(self, name: str) -> Iterator[None]:
        """Mark a span whose start level and peak level :meth:`levels` returns."""
        self._names.append(name)
        with record_function(f'mesa_seg.memory::{name}'):
            yield

    def levels(self, name: str) -> Tuple[int, int]:
        """``(level at the window's start, peak level inside it)`` in bytes."""
        if self.end_level is None:
            raise RuntimeError('CPUAllocatorTrace: levels are available after the trace ends')
        return self._levels[name]

    def peak_ops(self, name: str) -> List[str]:
        """The profiler events running when window ``name`` peaked, outermost
        first (e.g. the backward node, then the aten op that allocated)."""
        self.levels(name)
        return self._peak_ops[name]

    def _summarize(self) -> None:
        events = self._prof.profiler.kineto_results.events()
        mem = sorted((e.start_ns(), e.nbytes()) for e in events
                     if e.name() == '[memory]' and e.device_type().name == 'CPU')
        spans = {}
        for e in events:
            if e.name().startswith('mesa_seg.memory::'):
                spans[e.name().split('::', 1)[1]] = (e.start_ns(), e.end_ns())
        missing = [n for n in self._names if n not in spans]
        if missing:
            raise RuntimeError(f'CPUAllocatorTrace: no profiler span for window(s) {missing}')
        times = [t for t, _ in mem]
        cumulative = list(accumulate(n for _, n in mem))
        ops = [e for e in events if e.name() != '[memory]'
               and not e.name().startswith('mesa_seg.memory::')]
        for name, (t0, t1) in spans.items():
            i, j = bisect_left(times, t0), bisect_right(times, t1)
            start = cumulative[i - 1] if i else 0
            at = max(range(i, j), key=cumulative.__getitem__, default=None)
            self._levels[name] = (start, start if at is None else cumulative[at])
            enclosing = [] if at is None else sorted(
                (e for e in ops if e.start_ns() <= times[at] <= e.end_ns()),
                key=lambda e: e.start_ns() - e.end_ns())  # longest first
            self._peak_ops[name] = [e.name() for e in enclosing]
        self.end_level = cumulative[-1] if cumulative else 0
