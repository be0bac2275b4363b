#!/usr/bin/env python
"""Test (and evaluate) a segmentor: mmseg's ``tools/test.py`` interface.

    python tools/test.py CONFIG CHECKPOINT [--work-dir DIR] [--out DIR]
        [--cfg-options KEY=VALUE ...] [--launcher none|pytorch|slurm]

Logic in :func:`mesa_seg.apis.run_test`.
"""
import sys

from mesa_seg.apis import run_test

if __name__ == '__main__':
    sys.exit(run_test())
