"""Training and testing entry points behind ``tools/train.py``/``tools/test.py``.

Same interface as mmseg's tools. On top of them:

- bad input (unknown config, malformed ``--cfg-options``, missing data root
  or checkpoint, unwritable work dir) is reported as one line, exit code 2,
  before anything is built or written;
- machines without CUDA train too: SyncBN -> BN, gloo for
  ``--launcher pytorch|slurm`` and ``--amp`` as bf16 autocast
  (see :mod:`mesa_seg.compat`).
"""
import argparse
import inspect
import logging
import os
import os.path as osp
import sys
import tempfile
from typing import Iterator, List, Optional, Sequence, Tuple

import torch
from mmengine.config import Config, DictAction
from mmengine.logging import print_log

from . import compat

__all__ = [
    'UsageError', 'load_config', 'prepare_cfg', 'build_runner', 'run_train',
    'run_test'
]

DATA_HINT = ('make the demo set with "python tools/make_demo_data.py {root}" '
             'or put ADE20K there (README, "Data"), or set '
             '--cfg-options {key}=PATH')


class UsageError(Exception):
    """Bad user input; the tools print it as one line and exit with 2."""


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


def load_config(path: str, cfg_options: Optional[dict] = None) -> Config:
    """Load a config file and merge ``--cfg-options`` into it.

    Raises:
        UsageError: If the file is missing or unparsable, or the options do
            not fit the config's structure.
    """
    if not osp.isfile(path):
        raise UsageError(f'config file not found: {path}')
    try:
        cfg = Config.fromfile(path)
    except SyntaxError as e:
        raise UsageError(f'cannot parse config {path}: {e}') from None
    if cfg_options:
        try:
            cfg.merge_from_dict(cfg_options)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise UsageError(f'bad --cfg-options {cfg_options}: {e}') from None
    return cfg


def _datasets(node, key: str) -> Iterator[Tuple[str, dict]]:
    """Dataset dicts with a ``data_root`` in a dataloader config, wrappers
    (RepeatDataset, ConcatDataset) included, with their dotted keys."""
    if isinstance(node, dict):
        if 'data_root' in node:
            yield key, node
        for k, v in node.items():
            if k != 'pipeline':
                yield from _datasets(v, f'{key}.{k}')
    elif isinstance(node, (list, tuple)):
        for i, v in enumerate(node):
            yield from _datasets(v, f'{key}.{i}')


def _suffixes(ds: dict) -> Tuple[str, str]:
    """The image and label suffixes a dataset config will use."""
    from mmseg.registry import DATASETS
    defaults = {}
    cls = DATASETS.get(ds.get('type', '')) if isinstance(
        ds.get('type'), str) else ds.get('type')
    if cls is not None:
        params = inspect.signature(cls.__init__).parameters
        defaults = {k: p.default for k, p in params.items()}
    return (ds.get('img_suffix', defaults.get('img_suffix', '.jpg')),
            ds.get('seg_map_suffix', defaults.get('seg_map_suffix', '.png')))


def _stems(folder: str, suffix: str) -> set:
    stems = set()
    for dirpath, _, files in os.walk(folder):
        rel = osp.relpath(dirpath, folder)
        for f in files:
            if f.endswith(suffix):
                stems.add(osp.normpath(osp.join(rel, f[:-len(suffix)])))
    return stems


def check_data(cfg: Config, loaders: Sequence[str]) -> None:
    """Fail early, naming the path, when a dataset folder is missing or its
    images and annotations do not pair up by name."""
    for loader in loaders:
        if not cfg.get(loader):
            continue
        for key, ds in _datasets(cfg[loader].get('dataset'),
                                 f'{loader}.dataset'):
            root = ds['data_root']
            hint = DATA_HINT.format(root=root, key=f'{key}.data_root')
            if not osp.isdir(root):
                raise UsageError(f'data root not found: {root}; {hint}')
            prefix = ds.get('data_prefix') or {}
            img_dir, ann_dir = (prefix.get('img_path'),
                                prefix.get('seg_map_path'))
            for sub in (img_dir, ann_dir):
                if sub and not osp.isdir(osp.join(root, sub)):
                    raise UsageError(
                        f'data root {root} has no {sub}/ folder (ADE20K '
                        f'layout expected); {hint}')
            if not (img_dir and ann_dir):
                continue
            img_suffix, ann_suffix = _suffixes(ds)
            imgs = _stems(osp.join(root, img_dir), img_suffix)
            anns = _stems(osp.join(root, ann_dir), ann_suffix)
            if not imgs:
                raise UsageError(
                    f'no *{img_suffix} images in {osp.join(root, img_dir)}')
            if imgs != anns:
                no_ann = sorted(imgs - anns)[:3]
                no_img = sorted(anns - imgs)[:3]
                raise UsageError(
                    f'images and annotations of {root} do not pair up '
                    f'({len(imgs)} *{img_suffix} in {img_dir}/, {len(anns)} '
                    f'*{ann_suffix} in {ann_dir}/); without annotation: '
                    f'{no_ann or "none"}, without image: {no_img or "none"}')


def check_work_dir(work_dir: str) -> None:
    try:
        os.makedirs(work_dir, exist_ok=True)
        with tempfile.TemporaryFile(dir=work_dir):
            pass
    except OSError as e:
        raise UsageError(
            f'work dir {work_dir} is not writable ({e.strerror}); '
            'choose another with --work-dir') from None


def check_pretrained(cfg: Config) -> None:
    """Local pretrained weights must exist (nothing is downloaded)."""
    model = cfg.get('model', {})
    paths = [model.get('pretrained')]
    for part in ('backbone', 'decode_head', 'auxiliary_head'):
        init_cfg = (model.get(part) or {}).get('init_cfg') or {}
        if isinstance(init_cfg, dict) and init_cfg.get('type') == 'Pretrained':
            paths.append(init_cfg.get('checkpoint'))
    for path in paths:
        if isinstance(path, str) and '://' not in path and \
                not osp.isfile(path):
            raise UsageError(
                f'pretrained weights not found: {path} (README, '
                '"Pretrained weights")')


def prepare_cfg(cfg: Config, launcher: str = 'none',
                amp: bool = False) -> Config:
    """Adapt a config to this machine (in place) and return it.

    Without CUDA: SyncBN -> BN, a CUDA-only AmpOptimWrapper -> bf16 on CPU,
    and for distributed launchers the gloo process group.
    """
    cfg.launcher = launcher
    cuda = torch.cuda.is_available()
    optim_wrapper = cfg.get('optim_wrapper')
    if amp and optim_wrapper is not None:
        if optim_wrapper.get('type') in ('AmpOptimWrapper',
                                         'CPUAmpOptimWrapper'):
            print_log(
                'AMP training is already enabled in your config.',
                logger='current',
                level=logging.WARNING)
        elif optim_wrapper.get('type', 'OptimWrapper') != 'OptimWrapper':
            raise UsageError(
                '--amp needs optim_wrapper.type OptimWrapper, got '
                f'{optim_wrapper.get("type")}')
        else:
            # fp16 + dynamic loss scaling on GPUs, as mmseg
            optim_wrapper.type = 'AmpOptimWrapper'
            optim_wrapper.loss_scale = 'dynamic'
    if not cuda:
        compat.sync_bn_to_bn(cfg.get('model'))
        if optim_wrapper is not None and \
                optim_wrapper.get('type') == 'AmpOptimWrapper':
            optim_wrapper.type = 'CPUAmpOptimWrapper'
            optim_wrapper.pop('loss_scale', None)
            optim_wrapper.dtype = 'bfloat16'
        compat.setup_cpu_distributed(cfg, launcher)
    return cfg


def build_runner(cfg: Config):
    """Build the Runner as mmseg's tools do (``runner_type`` honoured)."""
    from mmengine.runner import Runner
    from mmseg.registry import RUNNERS
    if cfg.get('visualizer') is not None:
        # mmengine reuses a visualizer instance by name: a second run in one
        # process would log into the first run's work dir.
        cfg.visualizer.name = f"{cfg.visualizer.get('name', 'visualizer')}_{cfg.work_dir}"
    if 'runner_type' not in cfg:
        return Runner.from_cfg(cfg)
    return RUNNERS.build(cfg)


def _set_work_dir(cfg: Config, work_dir: Optional[str],
                  config_path: str) -> None:
    # priority as mmseg: CLI > config > ./work_dirs/<config name>
    if work_dir is not None:
        cfg.work_dir = work_dir
    elif cfg.get('work_dir') is None:
        cfg.work_dir = osp.join('./work_dirs',
                                osp.splitext(osp.basename(config_path))[0])
    check_work_dir(cfg.work_dir)


def _finish() -> None:
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _run(main, argv: Optional[List[str]]) -> int:
    from .resilience import NonFiniteLossError
    prog = osp.basename(sys.argv[0]) if sys.argv and sys.argv[0] else 'mesa'
    try:
        main(argv)
    except UsageError as e:
        print(f'{prog}: error: {e}', file=sys.stderr)
        return 2
    except NonFiniteLossError as e:
        print(f'{prog}: error: {e}', file=sys.stderr)
        return 1
    return 0


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

    cfg = load_config(args.config, args.cfg_options)
    _set_work_dir(cfg, args.work_dir, args.config)
    if args.resume not in (None, 'auto'):
        if not osp.isfile(args.resume):
            raise UsageError(f'checkpoint to resume not found: {args.resume}')
        cfg.load_from = args.resume
    cfg.resume = args.resume is not None
    check_data(cfg, ['train_dataloader', 'val_dataloader'])
    check_pretrained(cfg)
    from .preflight import check_inputs  # imports this module
    check_inputs(cfg, ['train_dataloader', 'val_dataloader'])
    prepare_cfg(cfg, args.launcher, args.amp)
    build_runner(cfg).train()
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

    cfg = load_config(args.config, args.cfg_options)
    if not osp.isfile(args.checkpoint):
        raise UsageError(f'checkpoint not found: {args.checkpoint}')
    _set_work_dir(cfg, args.work_dir, args.config)
    cfg.load_from = args.checkpoint
    if args.out is not None:
        cfg.test_evaluator['output_dir'] = args.out
        cfg.test_evaluator['keep_results'] = True
    check_data(cfg, ['test_dataloader'])
    from .preflight import check_inputs  # imports this module
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
