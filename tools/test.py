#!/usr/bin/env python
"""Test (and evaluate) a segmentor: mmseg's ``tools/test.py`` interface.

    python tools/test.py CONFIG CHECKPOINT [--work-dir DIR] [--out DIR]
        [--cfg-options KEY=VALUE ...] [--launcher none|pytorch|slurm]

Logic in :func:`mesa_seg.cli.run_test`, which first registers mesa-seg's models
and hooks (:func:`mesa_seg.register_all_modules`).
"""
import sys

from mesa_seg.cli import run_test

if __name__ == '__main__':
    sys.exit(run_test())
