"""What a measurement ran on: library versions, CPU/GPU, threads.

Shared by every report that prints figures (``tools/memory_report.py``,
``tools/benchmark.py``, ``tools/compare_training.py``), so their headers
describe the machine the same way.
"""
from __future__ import annotations

import os
import platform
from typing import Dict

__all__ = ['describe_machine']


def _cpu_name() -> str:
    name = platform.processor() or platform.machine()
    try:
        with open('/proc/cpuinfo') as f:
            return next(line.split(':', 1)[1].strip() for line in f
                        if line.startswith('model name'))
    except (OSError, StopIteration):
        return name


def describe_machine(device: str = 'cpu') -> Dict:
    """Versions (torch, mmseg, mmengine, python), platform, the device's name
    (the CUDA device when ``device == 'cuda'`` and one is present, else the
    CPU model) and the CPU count."""
    import mmengine
    import mmseg
    import torch
    name = _cpu_name()
    if device == 'cuda' and torch.cuda.is_available():
        name = torch.cuda.get_device_name()
    return dict(torch=torch.__version__, mmseg=mmseg.__version__,
                mmengine=mmengine.__version__, python=platform.python_version(),
                platform=platform.platform(), device_name=name,
                cpu_count=os.cpu_count())
