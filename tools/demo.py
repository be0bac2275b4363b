#!/usr/bin/env python
"""``make demo``: train the flagship config on the embedded demo data, on CPU.

1. writes the demo dataset to ``data/demo_ade`` unless it is there;
2. trains ``configs/demo/upernet_swin_mesa_demo.py`` (Mesa UperNet-Swin-T,
   CPU-sized schedule; the FP32 ``upernet_swin_demo.py`` with ``--config``)
   from scratch, validating at the end, and prints the mIoU next to the
   mIoU of always predicting the most frequent class;
3. prints the Mesa-vs-FP32 training memory table of ``tools/memory_report.py``
   (small input, so it stays quick).

    python tools/demo.py [--config CONFIG] [--work-dir DIR]
        [--no-memory-report] [--cfg-options KEY=VALUE ...]
"""
import argparse
import os
import os.path as osp
import subprocess
import sys
import time

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
DATA_ROOT = 'data/demo_ade'
MESA_DEMO = 'configs/demo/upernet_swin_mesa_demo.py'
FP32_DEMO = 'configs/demo/upernet_swin_demo.py'
LOADERS = ('train_dataloader', 'val_dataloader', 'test_dataloader')
# ~2 min on 2 CPU cores. At 256 px activations already outweigh gradients, so
# the peak shows Mesa's saving; at 128 px both peaks sit in the optimizer step.
MEMORY_REPORT = [
    'configs/upernet_swin_mesa.py', '--baseline', 'configs/upernet_swin.py',
    '--size', '256', '256', '--batch', '2', '--steps', '1', '--out',
    'work_dirs/demo/memory'
]


def _step(msg: str) -> None:
    print(f'\n==> {msg}', flush=True)


def _make_data(data_root: str) -> None:
    from mesa_seg.datasets import write_demo_dataset
    if osp.isfile(osp.join(data_root, 'demo_meta.json')):
        print(f'using the demo data in {data_root}')
        return
    start = time.time()
    meta = write_demo_dataset(data_root)
    print(f'wrote {meta["counts"]["training"]} training + '
          f'{meta["counts"]["validation"]} validation images to {data_root} '
          f'in {time.time() - start:.0f} s')


def _train(config: str, work_dir: str, data_root: str, options: dict):
    from mesa_seg import apis
    options = dict(options or {})
    options.update({f'{k}.dataset.data_root': data_root for k in LOADERS})
    cfg = apis.load_config(config, options)
    cfg.work_dir = work_dir
    apis.check_work_dir(work_dir)
    apis.check_data(cfg, ['train_dataloader', 'val_dataloader'])
    apis.prepare_cfg(cfg)
    runner = apis.build_runner(cfg)
    runner.train()
    hub = runner.message_hub
    return {k: hub.get_scalar(f'val/{k}').current() for k in ('mIoU', 'aAcc')}


def _memory_report() -> None:
    if not osp.isfile(osp.join(ROOT, 'tools', 'memory_report.py')):
        print('tools/memory_report.py is not there yet: skipped')
        return
    cmd = [sys.executable, 'tools/memory_report.py', *MEMORY_REPORT]
    print('$ ' + ' '.join(cmd[1:]), flush=True)
    if subprocess.run(cmd).returncode != 0:
        print('memory report failed (see above); the training result stands')


def main(argv=None) -> int:
    from mmengine.config import DictAction
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        '--config',
        help=f'demo config (default: {MESA_DEMO}, or {FP32_DEMO} '
        'while the Mesa one does not exist)')
    parser.add_argument('--work-dir', default='work_dirs/demo')
    parser.add_argument('--data-root', default=DATA_ROOT)
    parser.add_argument('--no-memory-report', action='store_true')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction)
    args = parser.parse_args(argv)
    os.chdir(ROOT)
    from mesa_seg.apis import UsageError
    from mesa_seg.datasets import majority_miou

    config = args.config or (MESA_DEMO if osp.isfile(MESA_DEMO) else FP32_DEMO)
    start = time.time()
    try:
        _step(f'1/3 demo data ({args.data_root})')
        _make_data(args.data_root)
        _step(f'2/3 training {config} from scratch on CPU '
              '(log every 10 iterations, validation at the end)')
        name = osp.splitext(osp.basename(config))[0]
        metrics = _train(config, osp.join(args.work_dir, name),
                         args.data_root, args.cfg_options)
    except UsageError as e:
        print(f'demo.py: error: {e}', file=sys.stderr)
        return 2
    train_min = (time.time() - start) / 60
    reference = majority_miou(args.data_root)
    _step('result')
    print(f'{config}: validation mIoU {metrics["mIoU"]:.1f} % '
          f'(pixel accuracy {metrics["aAcc"]:.1f} %) after '
          f'{train_min:.1f} min; predicting the most frequent class '
          f'everywhere scores {reference:.1f} % mIoU')
    print(f'checkpoint and logs: {osp.join(args.work_dir, name)}')
    if not args.no_memory_report:
        _step('3/3 training memory, Mesa vs full precision')
        _memory_report()
    print(f'\ndemo finished in {(time.time() - start) / 60:.1f} min')
    return 0


if __name__ == '__main__':
    sys.exit(main())
