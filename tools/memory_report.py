#!/usr/bin/env python
"""Peak training memory and activation memory of Mesa vs full-precision configs.

    python tools/memory_report.py CONFIG [CONFIG ...] --baseline CONFIG
        [--size H W] [--batch B] [--steps N] [--device cpu|cuda] [--out DIR]
        [--sweep batch] [--budget-mb MB] [--cfg-options KEY=VALUE ...]

Logic in :mod:`mesa_seg.memory` (see :mod:`mesa_seg.memory.cli`).
"""
import sys

from mesa_seg.memory.cli import main

if __name__ == '__main__':
    sys.exit(main())
