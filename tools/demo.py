#!/usr/bin/env python
"""``make demo``: train the flagship config on the embedded demo data, on CPU.

1. writes the demo dataset to ``data/demo_ade`` unless it is there;
2. trains ``configs/demo/upernet_swin_mesa_demo.py`` (Mesa UperNet-Swin-T,
   CPU-sized schedule; the FP32 ``upernet_swin_demo.py`` with ``--config``)
   from scratch, validating at the end, and prints the validation mIoU and
   pixel accuracy next to the mIoU of always predicting the most frequent
   class, and the IoU of each class in the validation images;
3. measures the training memory of the ``fp32``, ``fused_loss``, ``cp`` and
   ``mesa`` strategies with ``tools/benchmark.py`` (small input, so it stays
   quick; ``fused_loss`` gives Mesa's own saving, same loss) and prints its
   table.

The console shows a progress bar per phase and the results. The full logs
stay in the work dir: mmengine's log file (config, hooks, every log line, the
per-class table) in ``<work dir>/<config name>/<timestamp>/``, whatever else
the training phase printed in ``<work dir>/<config name>/console.log``, the
memory benchmark's report and logs in ``<work dir>/benchmark/``. ``--verbose``
shows the training's full output on the console instead.

    python tools/demo.py [--config CONFIG] [--work-dir DIR] [--data-root DIR]
        [--no-memory-report] [--verbose] [--cfg-options KEY=VALUE ...]
"""
import argparse
import contextlib
import os
import os.path as osp
import subprocess
import sys
import time
from typing import Dict, Optional, TextIO, Tuple

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
DATA_ROOT = 'data/demo_ade'
NUM_TRAIN, NUM_VAL = 40, 10  # images the demo data set gets
MESA_DEMO = 'configs/demo/upernet_swin_mesa_demo.py'
FP32_DEMO = 'configs/demo/upernet_swin_demo.py'
LOADERS = ('train_dataloader', 'val_dataloader', 'test_dataloader')
BENCHMARK = 'tools/benchmark.py'
# fused_loss: Mesa's own saving is read against FP32 with the same loss.
STRATEGIES = ('fp32', 'fused_loss', 'cp', 'mesa')
# At 256 px activations already outweigh gradients, so the peak shows what a
# strategy saves; at 128 px every peak sits in the optimizer step.
BENCHMARK_ARGS = [
    '--models', 'upernet_swin', '--strategies', *STRATEGIES, '--size', '256',
    '256', '--batch', '2', '--steps', '1'
]


def _step(msg: str) -> None:
    print(f'\n==> {msg}', flush=True)


def _bar(console: Optional[TextIO], **kwargs):
    """A tqdm bar on the console; a no-op bar when ``console`` is None."""
    from tqdm import tqdm
    return tqdm(file=console, disable=console is None, dynamic_ncols=True,
                **kwargs)


def _console() -> Optional[TextIO]:
    """A stream to the terminal (stderr) that stays there while
    :func:`_output_to` redirects stdout and stderr; None if they are not
    file descriptors (then nothing is redirected)."""
    try:
        sys.stdout.fileno()
        sys.stderr.flush()
        return os.fdopen(os.dup(sys.stderr.fileno()), 'w', buffering=1)
    except (AttributeError, OSError, ValueError):
        return None


@contextlib.contextmanager
def _output_to(path: str):
    """Everything written to stdout and stderr inside the block -- Python's
    prints, loggers and warnings, C libraries, child processes -- goes to
    ``path``. Redirects file descriptors (1, 2 and those of ``sys.stdout``
    and ``sys.stderr``), so loggers created inside write to the terminal
    again afterwards."""
    fds = {1, 2, sys.stdout.fileno(), sys.stderr.fileno()}
    saved = {}
    with open(path, 'w') as f:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
            for fd in fds:
                saved[fd] = os.dup(fd)
                os.dup2(f.fileno(), fd)
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            for fd, copy in saved.items():
                os.dup2(copy, fd)
                os.close(copy)


def _make_data(data_root: str, console: Optional[TextIO]) -> None:
    from mesa_seg.datasets import write_demo_dataset
    if osp.isfile(osp.join(data_root, 'demo_meta.json')):
        print(f'using the demo data in {data_root}')
        return
    start = time.time()
    with _bar(console, total=NUM_TRAIN + NUM_VAL, desc='demo data',
              unit='img') as bar:
        meta = write_demo_dataset(
            data_root, NUM_TRAIN, NUM_VAL, progress=bar.update)
    print(f'wrote {meta["counts"]["training"]} training + '
          f'{meta["counts"]["validation"]} validation images to {data_root} '
          f'in {time.time() - start:.0f} s')


def _class_iou(results: list, classes) -> Tuple[Dict[str, float], int]:
    """From the ``(intersect, union, pred_area, label_area)`` per-image
    results of mmseg's ``IoUMetric`` (summed over images as the metric does):
    the IoU (%) of each class present in the labels, and how many classes
    were predicted but are absent from the labels (IoU 0, counted in the
    mIoU)."""
    inter, union, _, label = (sum(parts) for parts in zip(*results))
    present = {
        classes[i]: 100.0 * float(inter[i]) / float(union[i])
        for i in range(len(classes)) if label[i] > 0
    }
    absent = sum(1 for i in range(len(classes))
                 if union[i] > 0 and not label[i] > 0)
    return present, absent


def _progress_hook(console: Optional[TextIO], found: dict):
    """A hook drawing one bar over the training iterations (with the current
    loss) and one over each validation, and putting the per-class IoU of the
    last validation into ``found['class_iou']``."""
    from mmengine.hooks import Hook
    from mmseg.evaluation import IoUMetric

    class DemoProgressHook(Hook):
        priority = 'VERY_LOW'

        def __init__(self):
            self.train_bar = self.val_bar = None

        def before_train(self, runner) -> None:
            self.train_bar = _bar(console, total=runner.max_iters,
                                  initial=runner.iter, desc='training',
                                  unit='it')

        def after_train_iter(self, runner, batch_idx, data_batch=None,
                             outputs=None) -> None:
            loss = (outputs or {}).get('loss')
            if loss is not None:
                self.train_bar.set_postfix(loss=f'{float(loss):.3f}',
                                           refresh=False)
            self.train_bar.update(1)
            if runner.iter + 1 >= runner.max_iters:
                self.train_bar.close()

        def after_train(self, runner) -> None:
            self.train_bar.close()

        def before_val_epoch(self, runner) -> None:
            for metric in runner.val_evaluator.metrics:
                if isinstance(metric, IoUMetric):
                    self._record_class_iou(metric)
            self.val_bar = _bar(console, total=len(runner.val_dataloader),
                                desc='validation', unit='batch')

        def after_val_iter(self, runner, batch_idx, data_batch=None,
                           outputs=None) -> None:
            self.val_bar.update(1)

        def after_val_epoch(self, runner, metrics=None) -> None:
            self.val_bar.close()

        @staticmethod
        def _record_class_iou(metric) -> None:
            if 'compute_metrics' in vars(metric):
                return  # wrapped at an earlier validation

            def compute_metrics(results, compute=metric.compute_metrics):
                found['class_iou'], found['absent_predicted'] = _class_iou(
                    results, metric.dataset_meta['classes'])
                return compute(results)

            metric.compute_metrics = compute_metrics

    return DemoProgressHook()


def _train(config: str, work_dir: str, data_root: str, options: dict,
           console: Optional[TextIO], verbose: bool) -> dict:
    from mesa_seg.runner import check_work_dir
    check_work_dir(work_dir)
    console_log = osp.join(work_dir, 'console.log')
    quiet = not verbose and console is not None
    with _output_to(console_log) if quiet else contextlib.nullcontext():
        from mesa_seg.preflight import check_data
        from mesa_seg.runner import build_runner, load_config, prepare_cfg
        from mesa_seg.setup_env import register_all_modules

        # the Runner sets the scope from the config's default_scope
        register_all_modules(init_default_scope=False)
        options = dict(options or {})
        options.update(
            {f'{k}.dataset.data_root': data_root for k in LOADERS})
        cfg = load_config(config, options)
        cfg.work_dir = work_dir
        check_data(cfg, ['train_dataloader', 'val_dataloader'])
        prepare_cfg(cfg)
        runner = build_runner(cfg)
        found = dict(log_file=runner.logger.log_file,
                     console_log=console_log if quiet else None)
        runner.register_hook(_progress_hook(None if verbose else console,
                                            found))
        try:
            runner.train()
        except BaseException:
            if quiet:
                print(f'demo.py: training failed; full logs: '
                      f'{found["log_file"]} and {console_log}',
                      file=console)
            raise
    hub = runner.message_hub
    found.update(
        {k: hub.get_scalar(f'val/{k}').current() for k in ('mIoU', 'aAcc')})
    found['val_images'] = len(runner.val_dataloader.dataset)
    return found


def _print_result(config: str, result: dict, seconds: float,
                  reference: float) -> None:
    print(f'{config}: validation mIoU {result["mIoU"]:.1f} %, pixel '
          f'accuracy {result["aAcc"]:.1f} % ({result["val_images"]} images)'
          f'; predicting the most frequent class everywhere: '
          f'{reference:.1f} % mIoU')
    ious = sorted(result.get('class_iou', {}).items(), key=lambda kv: -kv[1])
    if ious:
        print('IoU (%) of the classes in the validation images: ' +
              ', '.join(f'{name} {iou:.1f}' for name, iou in ious))
    absent = result.get('absent_predicted', 0)
    if absent:
        print(f'(mIoU also counts {absent} classes predicted but absent '
              'from the validation labels, at IoU 0)')
    print(f'training + validation: {seconds / 60:.1f} min')
    print(f'full log (config, hooks, all log lines, per-class table): '
          f'{result["log_file"]}')
    if result.get('console_log'):
        print(f'console output of the training: {result["console_log"]}')


def _benchmark(work_dir: str) -> None:
    """Run the memory benchmark. It is quiet by itself: a progress bar on
    stderr, then the table and the path of the full report on stdout."""
    if not osp.isfile(osp.join(ROOT, BENCHMARK)):
        print(f'{BENCHMARK} is not there: memory table skipped')
        return
    cmd = [
        sys.executable, BENCHMARK, *BENCHMARK_ARGS, '--out',
        osp.join(work_dir, 'benchmark')
    ]
    print('$ ' + ' '.join(['python', *cmd[1:]]), flush=True)
    returncode = subprocess.run(cmd).returncode
    if returncode != 0:
        print(f'memory benchmark failed (exit code {returncode}, see above); '
              'the training result stands')


def main(argv=None) -> int:
    from mmengine.config import DictAction
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        '--config',
        default=MESA_DEMO,
        help=f'demo config (default: {MESA_DEMO}; its FP32 twin: '
        f'{FP32_DEMO})')
    parser.add_argument('--work-dir', default='work_dirs/demo')
    parser.add_argument('--data-root', default=DATA_ROOT)
    parser.add_argument(
        '--no-memory-report',
        action='store_true',
        help='skip step 3 (the memory benchmark)')
    parser.add_argument(
        '--verbose',
        action='store_true',
        help='show the full output (config, log lines, per-class table) on '
        'the console instead of progress bars')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction)
    args = parser.parse_args(argv)
    os.chdir(ROOT)
    console = _console()
    try:
        return _demo(args, console)
    finally:
        if console is not None:
            console.close()


def _demo(args, console: Optional[TextIO]) -> int:
    from mesa_seg.datasets import majority_miou
    from mesa_seg.errors import NonFiniteLossError, UsageError

    start = time.time()
    name = osp.splitext(osp.basename(args.config))[0]
    try:
        _step(f'1/3 demo data ({args.data_root})')
        _make_data(args.data_root, console)
        _step(f'2/3 training {args.config} from scratch on CPU, then '
              'validation')
        train_start = time.time()
        result = _train(args.config, osp.join(args.work_dir, name),
                        args.data_root, args.cfg_options, console,
                        args.verbose)
    except UsageError as e:
        print(f'demo.py: error: {e}', file=sys.stderr)
        return 2
    except NonFiniteLossError as e:
        print(f'demo.py: error: {e}', file=sys.stderr)
        return 1
    train_seconds = time.time() - train_start
    _step('result')
    _print_result(args.config, result, train_seconds,
                  majority_miou(args.data_root))
    if not args.no_memory_report:
        _step('3/3 training memory: full precision, fused loss, activation '
              'checkpointing, Mesa')
        _benchmark(args.work_dir)
    print(f'\ndemo finished in {(time.time() - start) / 60:.1f} min')
    return 0


if __name__ == '__main__':
    sys.exit(main())
