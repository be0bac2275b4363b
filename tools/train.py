#!/usr/bin/env python
"""Train a segmentor: mmseg's ``tools/train.py`` interface.

    python tools/train.py CONFIG [--work-dir DIR] [--resume [CKPT]] [--amp]
        [--cfg-options KEY=VALUE ...] [--launcher none|pytorch|slurm]

Logic in :func:`mesa_seg.cli.run_train`, which first registers mesa-seg's models
and hooks (:func:`mesa_seg.register_all_modules`).
"""
import sys

from mesa_seg.cli import run_train

if __name__ == '__main__':
    sys.exit(run_train())
