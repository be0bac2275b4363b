#!/usr/bin/env python
"""Step-time ratios of strategies with their steps interleaved in one process
(robust to the machine's drift; time only):

    python tools/interleaved_time.py --model fpn_pvt --strategies fused_loss mesa \
        [--size H W] [--batch B] [--rounds N] [--threads N] [--out FILE.json]

Logic in :mod:`mesa_seg.benchmark.interleaved`.
"""
import sys

from mesa_seg.benchmark.interleaved import main

if __name__ == '__main__':
    sys.exit(main())
