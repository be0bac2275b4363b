#!/usr/bin/env python
"""Write the embedded demo dataset (ADE20K layout) to OUT_DIR.

    python tools/make_demo_data.py OUT_DIR [--num-train N] [--num-val M]
        [--size S] [--seed K]

OUT_DIR then works as ``data_root`` of any ADE20K config. Generator:
:mod:`mesa_seg.datasets.demo_data`.
"""
import argparse
import sys
import time

from mesa_seg.datasets.demo_data import write_demo_dataset


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('out_dir', help='destination (new or empty folder)')
    parser.add_argument('--num-train', type=int, default=40)
    parser.add_argument('--num-val', type=int, default=10)
    parser.add_argument(
        '--size', type=int, default=512, help='image height (pixels)')
    parser.add_argument('--seed', type=int, default=0)
    args = parser.parse_args(argv)
    start = time.time()
    try:
        meta = write_demo_dataset(args.out_dir, args.num_train, args.num_val,
                                  args.size, args.seed)
    except (ValueError, OSError) as e:
        print(f'make_demo_data.py: error: {e}', file=sys.stderr)
        return 2
    print(f'wrote {meta["counts"]["training"]} training + '
          f'{meta["counts"]["validation"]} validation images to '
          f'{args.out_dir} in {time.time() - start:.1f} s')
    return 0


if __name__ == '__main__':
    sys.exit(main())
