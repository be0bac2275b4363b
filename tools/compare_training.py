#!/usr/bin/env python
"""Train FP32 and Mesa with the same seed and data; report loss curves and
mIoU side by side (``report.md``, ``report.json``, ``report.png``).

    python tools/compare_training.py [--baseline CONFIG] [--mesa CONFIG]
        [--data-root DIR] [--iters N] [--crop H W] [--batch B] [--seed S]
        [--val-interval N] [--out DIR] [--own-init]
        [--cfg-options KEY=VALUE ...]

Defaults: the demo configs on data/demo_ade (written if missing), 200
iterations, work_dirs/compare, both runs from the baseline's initial
weights. Logic in :mod:`mesa_seg.compare` (:mod:`mesa_seg.compare.cli`).
"""
import sys

from mesa_seg.compare import main

if __name__ == '__main__':
    sys.exit(main())
