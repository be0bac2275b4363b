"""``tools/compare_training.py``: FP32 and Mesa trained side by side.

    python tools/compare_training.py [--baseline CONFIG] [--mesa CONFIG]
        [--data-root DIR] [--iters N] [--crop H W] [--batch B] [--seed S]
        [--val-interval N] [--out DIR] [--own-init]
        [--cfg-options KEY=VALUE ...]

Both runs train through :func:`~mesa_seg.compare.runs.compare`; the report
goes to ``OUT/report.{md,json,png}`` and ``report.md`` is printed.
"""
from __future__ import annotations

import argparse
import os.path as osp
from typing import List, Optional

from .runs import compare

__all__ = ['main', 'parse_args']


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    """The tool's arguments.

    Args:
        argv (list[str], optional): Default: ``sys.argv[1:]``.

    Returns:
        argparse.Namespace: The parsed arguments.
    """
    parser = argparse.ArgumentParser(
        description='Train FP32 and Mesa with the same seed and data; '
        'report loss curves and mIoU side by side.')
    parser.add_argument('--baseline', default='configs/demo/upernet_swin_demo.py')
    parser.add_argument('--mesa',
                        default='configs/demo/upernet_swin_mesa_demo.py')
    parser.add_argument('--data-root', default='data/demo_ade',
                        help='written with the demo data if missing')
    parser.add_argument('--iters', type=int, default=200)
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--crop', type=int, nargs=2, metavar=('H', 'W'))
    parser.add_argument('--batch', type=int)
    parser.add_argument('--val-interval', type=int)
    parser.add_argument('--out', default='work_dirs/compare')
    parser.add_argument('--cfg-options', nargs='+', default=[],
                        metavar='KEY=VALUE', help='for both runs')
    parser.add_argument(
        '--own-init', action='store_true',
        help='each run initialises its own weights from the seed (default: '
        "both start from the baseline's initial weights)")
    return parser.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    """Run the tool.

    Args:
        argv (list[str], optional): Default: ``sys.argv[1:]``.

    Returns:
        int: 0, or 1 when a run's loss went non-finite.
    """
    args = parse_args(argv)
    if not osp.isdir(args.data_root):
        from ..datasets import write_demo_dataset
        print(f'writing the demo data to {args.data_root}', flush=True)
        write_demo_dataset(args.data_root)
    report = compare(
        dict(fp32=args.baseline, mesa=args.mesa), args.data_root, args.out,
        args.iters, args.seed, args.crop, args.batch, args.val_interval,
        args.cfg_options, same_init=not args.own_init)
    with open(osp.join(args.out, 'report.md')) as f:
        print(f.read())
    return 0 if all(s['finite'] for s in report['summary'].values()) else 1
