"""Training and testing entry points behind ``tools/train.py``/``tools/test.py``.

Same interface as mmseg's tools. On top of them:

- bad input (unknown config, malformed ``--cfg-options``, missing data root
  or checkpoint, unwritable work dir, and the checks of
  :mod:`mesa_seg.preflight`) is reported as one line, exit code 2, before
  anything is built or written;
- faults during training stop every rank with one line each and the exit
  code of :mod:`mesa_seg.errors`: a NaN/Inf loss or a data file that no
  longer loads 1, a rank that died or hung 3, a checkpoint that cannot be
  written 4, SIGTERM (preemption; checkpoint saved) 75;
- machines without CUDA train too: SyncBN -> BN, gloo for
  ``--launcher pytorch|slurm`` and ``--amp`` as bf16 autocast
  (see :func:`mesa_seg.runner.prepare_cfg`).

Argument parsing and error printing live here; building the Runner is
:mod:`mesa_seg.runner`.
"""
import argparse
import gc
import os
import os.path as osp
import sys
from typing import List, Optional

from mmengine.config import DictAction
from mmengine.dist import get_dist_info

from .data_faults import data_file_message
from .distributed import (is_comm_failure, short_reason,
                          unresponsive_ranks)
from .errors import (CheckpointSaveError, DataFileError, NonFiniteLossError,
                     Preempted, RankFailureError, UsageError, exit_code)
from .preflight import (check_data, check_inputs, check_pretrained,
                        check_resume_world_size, launch_world_size)
from .runner import build_runner, load_config, prepare_cfg, set_work_dir
from .setup_env import register_all_modules

__all__ = ['run_train', 'run_test']


class _CfgOptionsAction(DictAction):
    """mmengine's DictAction, with a usage error instead of a traceback."""

    def __call__(self, parser, namespace, values, option_string=None):
        for kv in values:
            key, sep, _ = kv.partition('=')
            if not sep or not key or any(not k for k in key.split('.')):
                raise argparse.ArgumentError(
                    self, f'expected KEY=VALUE (e.g. train_cfg.max_iters=100)'
                    f', got {kv!r}')
        super().__call__(parser, namespace, values, option_string)


def _add_common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('--work-dir', help='folder for logs and checkpoints')
    parser.add_argument(
        '--cfg-options',
        nargs='+',
        action=_CfgOptionsAction,
        help='override config settings, KEY=VALUE pairs merged into the '
        'config, e.g. train_cfg.max_iters=100 "model.backbone.depths=[2,2,2,2]"')
    parser.add_argument(
        '--launcher',
        choices=['none', 'pytorch', 'slurm'],
        default='none',
        help='job launcher (pytorch = torchrun, see tools/dist_train.sh)')
    # torch.distributed.launch passes --local-rank (torch >= 2.0)
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)


def _finish() -> None:
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        # The runner's DDP reducer keeps the gloo group (and its worker
        # threads) alive past destroy_process_group; left to interpreter
        # teardown, a rank could abort after a finished run ("terminate called
        # without an active exception"). The runner is garbage by now: free it.
        gc.collect()
        dist.destroy_process_group()


def _run(main, argv: Optional[List[str]]) -> int:
    prog = osp.basename(sys.argv[0]) if sys.argv and sys.argv[0] else 'mesa'
    try:
        main(argv)
    except (UsageError, NonFiniteLossError, DataFileError, RankFailureError,
            CheckpointSaveError, Preempted) as e:
        rank, world_size = get_dist_info()
        kind = 'preempted' if isinstance(e, Preempted) else 'error'
        where = f'[rank {rank}] ' if world_size > 1 else ''
        # one write: the lines of several ranks sharing a pipe stay apart
        sys.stderr.write(f'{prog}: {kind}: {where}{e}\n')
        sys.stderr.flush()
        if isinstance(e, (NonFiniteLossError, CheckpointSaveError, Preempted)):
            e.__traceback__ = None  # its frames hold the runner (see _finish)
            _finish()  # every rank stops here: they agreed on it
        return exit_code(e)
    return 0


def _last_checkpoint(runner) -> str:
    # the work dir's last_checkpoint, written only after a complete save
    # (not the message hub's, which names a checkpoint before it is written)
    path = osp.join(runner.work_dir, 'last_checkpoint')
    if osp.isfile(path):
        with open(path) as f:
            path = f.read().strip()
    else:
        path = None
    return f'the last checkpoint, {path}, is intact' if path else \
        'no checkpoint was written yet'


def _fit(runner) -> None:
    """``runner.train()``, with the faults that surface as library errors
    turned into one-line ones naming the iteration."""
    try:
        runner.train()
    except DataFileError as e:
        raise DataFileError(
            f'iteration {runner.iter + 1}: {data_file_message(e)}; training '
            f'stopped, {_last_checkpoint(runner)}: restore the file (or '
            'remove the sample) and continue with --resume') from None
    except RuntimeError as e:
        if isinstance(e, (CheckpointSaveError, RankFailureError)) or \
                not is_comm_failure(e):
            raise
        world_size = get_dist_info()[1]
        lost = unresponsive_ranks()
        who = 'the rendezvous store is unreachable too (it runs in rank 0 ' \
            'or the launcher): rank 0 or its node is gone' if lost is None \
            else f'rank{"s" if len(lost) > 1 else ""} ' \
            f'{", ".join(map(str, lost))} did not answer' if lost else \
            'all ranks still answer'
        raise RankFailureError(
            f'lost contact with the other ranks at iteration '
            f'{runner.iter + 1} ({short_reason(e)}); {who}. Stopped; '
            f'{_last_checkpoint(runner)}: continue with --resume once all '
            f'{world_size} ranks run again') from None
    finally:
        from .hooks import PreemptionHook
        for hook in runner.hooks:
            if isinstance(hook, PreemptionHook):
                hook.restore()


def _train(argv: Optional[List[str]]) -> None:
    parser = argparse.ArgumentParser(description='Train a segmentor')
    parser.add_argument('config', help='train config file path')
    parser.add_argument(
        '--resume',
        nargs='?',
        const='auto',
        metavar='CKPT',
        help='resume from CKPT, or without CKPT from the latest checkpoint '
        'in the work dir')
    parser.add_argument(
        '--amp',
        action='store_true',
        help='mixed precision: fp16 on CUDA, bf16 on CPU')
    _add_common_args(parser)
    args = parser.parse_args(argv)
    os.environ.setdefault('LOCAL_RANK', str(args.local_rank))
    # the Runner sets the scope from the config's default_scope
    register_all_modules(init_default_scope=False)

    cfg = load_config(args.config, args.cfg_options)
    set_work_dir(cfg, args.work_dir, args.config)
    if args.resume not in (None, 'auto'):
        if not osp.isfile(args.resume):
            raise UsageError(f'checkpoint to resume not found: {args.resume}')
        cfg.load_from = args.resume
    cfg.resume = args.resume is not None
    check_data(cfg, ['train_dataloader', 'val_dataloader'])
    check_pretrained(cfg)
    check_inputs(cfg, ['train_dataloader', 'val_dataloader'])
    check_resume_world_size(cfg, launch_world_size(args.launcher))
    prepare_cfg(cfg, args.launcher, args.amp)
    _fit(build_runner(cfg))
    _finish()


def _test(argv: Optional[List[str]]) -> None:
    parser = argparse.ArgumentParser(
        description='Test (and evaluate) a segmentor')
    parser.add_argument('config', help='test config file path')
    parser.add_argument('checkpoint', help='checkpoint file')
    parser.add_argument(
        '--out', help='folder to save the predicted label maps (PNG) to')
    _add_common_args(parser)
    args = parser.parse_args(argv)
    os.environ.setdefault('LOCAL_RANK', str(args.local_rank))
    register_all_modules(init_default_scope=False)

    cfg = load_config(args.config, args.cfg_options)
    if not osp.isfile(args.checkpoint):
        raise UsageError(f'checkpoint not found: {args.checkpoint}')
    set_work_dir(cfg, args.work_dir, args.config)
    cfg.load_from = args.checkpoint
    if args.out is not None:
        cfg.test_evaluator['output_dir'] = args.out
        cfg.test_evaluator['keep_results'] = True
    check_data(cfg, ['test_dataloader'])
    check_inputs(cfg, ['test_dataloader'])
    prepare_cfg(cfg, args.launcher)
    build_runner(cfg).test()
    _finish()


def run_train(argv: Optional[List[str]] = None) -> int:
    """``tools/train.py``: returns the exit code."""
    return _run(_train, argv)


def run_test(argv: Optional[List[str]] = None) -> int:
    """``tools/test.py``: returns the exit code."""
    return _run(_test, argv)
