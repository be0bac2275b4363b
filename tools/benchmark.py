#!/usr/bin/env python
"""Strategy leaderboard: fp32, fused loss, AMP, checkpointing (full and
selective), Mesa and Mesa combined with AMP / checkpointing, on each model.

    python tools/benchmark.py [--models NAME|CONFIG ...] [--strategies NAME ...]
        [--size H W] [--batch B] [--steps N] [--warmup N] [--device cpu|cuda]
        [--sweep batch] [--threads N] [--timeout S] [--out DIR]
        [--cfg-options KEY=VALUE ...]

Logic in :mod:`mesa_seg.benchmark` (see :mod:`mesa_seg.benchmark.cli`).
"""
import sys

from mesa_seg.benchmark.cli import main

if __name__ == '__main__':
    sys.exit(main())
