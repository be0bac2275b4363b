"""Input checks that run before anything is built or written.

``tools/train.py`` and ``tools/test.py`` (:mod:`mesa_seg.cli`) run them after
loading the config and checking the work dir. Every problem is a one-line
:class:`~mesa_seg.errors.UsageError` (exit 2), raised before the Runner
creates its log folder:

- data roots exist and their images and annotations pair up by name
  (:func:`check_data`);
- local pretrained weights exist (:func:`check_pretrained`);
- datasets: files decode, annotations are single-channel label maps of the
  image's size, with values inside the class range (:func:`check_dataset`);
- the train crop fits the images the resize step can produce and the model's
  input size (:func:`check_train_crop`);
- the model config builds (unknown Mesa option, unsupported bit width, group
  count not dividing channels or heads, ...) (:func:`check_model`);
- the checkpoint to load or resume fits that model (:func:`check_checkpoint`);
- a checkpoint to resume was trained on as many ranks as this launch has
  (:func:`check_resume_world_size`).

:func:`check_inputs` runs the checks from datasets to checkpoint.
"""
from __future__ import annotations

import copy
import inspect
import os
import os.path as osp
from typing import Iterator, Optional, Sequence, Tuple

import numpy as np
import torch
from mmengine.config import Config
from mmengine.logging import print_log
from PIL import Image
from torch import nn

from .errors import DataError, UsageError
from .models.checkpoint import match_state_dict

__all__ = [
    'check_data', 'check_pretrained', 'check_inputs', 'check_dataset',
    'check_train_crop', 'check_model', 'check_checkpoint',
    'check_resume_world_size', 'launch_world_size', 'checkpoint_to_load', 'CONTENT_CHECK_LIMIT', 'DATA_HINT'
]

#: Datasets up to this many images get every image and annotation decoded
#: (slow for big sets); larger ones get headers only (much cheaper) and
#: their labels are checked per batch by ``LabelRangeHook``.
CONTENT_CHECK_LIMIT = 1000
_MAX_LABELS = 5  # bad label values named in a message
_LABEL_MODES = ('1', 'L', 'P', 'I', 'I;16')

DATA_HINT = ('make the demo set with "python tools/make_demo_data.py {root}" '
             'or put ADE20K there (README, "Data"), or set '
             '--cfg-options {key}=PATH')


# ----------------------------------------------------------- paths, files
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


def check_inputs(cfg: Config, loaders: Sequence[str]) -> nn.Module:
    """Run every check of this module; returns the dry-built model.

    Args:
        cfg (Config): The config, as the Runner will get it (``work_dir``,
            ``load_from`` and ``resume`` set).
        loaders (Sequence[str]): Dataloader keys whose datasets are checked.
    """
    if 'train_dataloader' in loaders:
        check_train_crop(cfg)
    for loader in loaders:
        if cfg.get(loader):
            for key, dataset in _datasets(cfg[loader].get('dataset'),
                                          f'{loader}.dataset'):
                check_dataset(dataset, key)
    model = check_model(cfg)
    checkpoint = checkpoint_to_load(cfg)
    if checkpoint:
        check_checkpoint(model, checkpoint)
    return model


def checkpoint_to_load(cfg: Config) -> Optional[str]:
    """The checkpoint the Runner will load or resume (as
    ``Runner.load_or_resume`` picks it), or None."""
    if cfg.get('resume') and cfg.get('load_from') is None:
        from mmengine.runner import find_latest_checkpoint
        return find_latest_checkpoint(cfg.work_dir) \
            if osp.isdir(cfg.work_dir) else None
    return cfg.get('load_from')


# ------------------------------------------------------------------ data
def check_dataset(dataset_cfg: dict, key: str = 'dataset',
                  content_limit: int = CONTENT_CHECK_LIMIT) -> None:
    """Check a segmentation dataset's files before training on it.

    The dataset is built as the Runner would (same file list, suffixes,
    class list, ``reduce_zero_label``), without its pipeline.

    Args:
        dataset_cfg (dict): A dataset config (mmseg ``BaseSegDataset`` type).
        key (str): Its config key, for messages. Default: 'dataset'.
        content_limit (int): Decode every file only up to this many images.
            Default: :data:`CONTENT_CHECK_LIMIT`.

    Raises:
        DataError: Naming the files and what is wrong with them.
    """
    from mmseg.registry import DATASETS
    cfg = copy.deepcopy(dict(dataset_cfg))
    cfg.update(pipeline=[], lazy_init=True)
    try:
        dataset = DATASETS.build(cfg)
        infos = dataset.load_data_list()
    except (OSError, AssertionError, ValueError, KeyError) as e:
        raise DataError(f'{key}: cannot list the dataset: {e}') from None
    img_dir = dataset.data_prefix.get('img_path', '')
    seg_dir = dataset.data_prefix.get('seg_map_path')
    if not infos:
        raise DataError(f'{key}: no images (*{dataset.img_suffix}) in '
                        f'{img_dir}')
    if not seg_dir:
        return
    # that images and annotations pair up by name is checked before, by
    # check_data
    num_classes = len(dataset.metainfo.get('classes') or ())
    full = len(infos) <= content_limit
    for info in infos:
        _check_pair(key, info['img_path'], info['seg_map_path'], full,
                    _label_range(dataset, num_classes, info))
    if not full:
        print_log(
            f'{key}: checked file headers of {len(infos)} image/annotation '
            f'pairs; more than {content_limit}, so pixel contents are '
            'checked as batches load (LabelRangeHook)',
            logger='current')


def _label_range(dataset, num_classes: int, info: dict) -> Optional[tuple]:
    """(largest valid raw label value, other allowed values, description),
    or None when labels are remapped (``label_map``): not checked here."""
    if not num_classes or info.get('label_map'):
        return None
    if info.get('reduce_zero_label'):
        # as mmseg's LoadAnnotations: raw 0 and 255 become the ignored 255,
        # raw v in 1..C becomes class v - 1
        return num_classes, (255, ), (
            f'{num_classes} classes with reduce_zero_label (0 and 255 '
            'ignored, v is class v - 1)')
    ignore = dataset.ignore_index
    return num_classes - 1, (ignore, ), (
        f'{num_classes} classes, ignore_index {ignore}')


def _open(kind: str, key: str, path: str, full: bool) -> Image.Image:
    try:
        img = Image.open(path)
        if full:
            img.load()
        return img
    except (OSError, SyntaxError, ValueError) as e:
        raise DataError(f'{key}: corrupt {kind} {path}: {e}') from None


def _check_pair(key: str, img_path: str, seg_path: str, full: bool,
                label_range: Optional[tuple]) -> None:
    with _open('image', key, img_path, full) as img, \
            _open('annotation', key, seg_path, full) as seg:
        if seg.mode not in _LABEL_MODES:
            raise DataError(
                f'{key}: annotation {seg_path} has mode {seg.mode}; a label '
                'map has one channel of class indices (PNG mode L or P)')
        if seg.size != img.size:
            raise DataError(
                f'{key}: annotation {seg_path} is {seg.size[0]}x{seg.size[1]}'
                f' but its image {img_path} is {img.size[0]}x{img.size[1]}')
        if not full or label_range is None:
            return
        labels = np.asarray(seg)
        top, allowed, described = label_range
        bad = (labels > top) & ~np.isin(labels, allowed)
        if bad.any():
            values = np.unique(labels[bad])[:_MAX_LABELS].tolist()
            raise DataError(
                f'{key}: annotation {seg_path} has label values {values} '
                f'outside 0..{top} for {described}')


# ------------------------------------------------------------- pipeline
def _pair(value) -> Tuple[int, int]:
    return (value, value) if isinstance(value, (int, float)) else tuple(value)


def _resize_bound(t: dict) -> Optional[Tuple[bool, float, float]]:
    """(keep_ratio, max width, max height) of images after a Resize or
    RandomResize step, None when it cannot be told from the config."""
    scale = t.get('scale')
    if scale is None or t.get('scale_factor') is not None:
        return None
    if isinstance(scale, (list, tuple)) and scale and \
            isinstance(scale[0], (list, tuple)):
        width, height = max(s[0] for s in scale), max(s[1] for s in scale)
    else:
        width, height = _pair(scale)
    ratio = t.get('ratio_range')
    factor = max(ratio) if ratio else 1.0
    return bool(t.get('keep_ratio', False)), width * factor, height * factor


def check_train_crop(cfg: Config) -> None:
    """The train crop must fit inside some image the resize step produces
    (otherwise every crop is padding in one dimension) and inside the
    model's input size (``data_preprocessor.size``), which batches are
    padded to.

    Raises:
        UsageError: Naming both sizes.
    """
    loader = cfg.get('train_dataloader') or {}
    size = ((cfg.get('model') or {}).get('data_preprocessor') or {}).get('size')
    for key, dataset in _datasets(loader.get('dataset'),
                                  'train_dataloader.dataset'):
        bound = None
        for t in dataset.get('pipeline') or []:
            kind = str(t.get('type'))
            if kind in ('Resize', 'RandomResize'):
                bound = _resize_bound(t)
            elif 'Resize' in kind:
                bound = None  # another resize: sizes unknown here
            elif kind == 'RandomCrop':
                crop_h, crop_w = _pair(t['crop_size'])
                _check_crop(key, (crop_h, crop_w), bound, size)


def _check_crop(key, crop, bound, size) -> None:
    crop_h, crop_w = crop
    if bound is not None:
        keep_ratio, width, height = bound
        if keep_ratio:
            fits = min(crop) <= min(width, height) and \
                max(crop) <= max(width, height)
            produced = (f'long side <= {max(width, height):g}, short side <= '
                        f'{min(width, height):g}')
        else:
            fits = crop_h <= height and crop_w <= width
            produced = f'at most {width:g}x{height:g} (w x h)'
        if not fits:
            raise UsageError(
                f'{key}.pipeline: RandomCrop crop_size={crop} (h, w) is larger'
                f' than any image the resize step produces ({produced}); every'
                ' crop would be padding. Lower crop_size or raise the scale')
    if size is not None:
        size_h, size_w = _pair(size)
        if crop_h > size_h or crop_w > size_w:
            raise UsageError(
                f'{key}.pipeline: RandomCrop crop_size={crop} is larger than '
                f'model.data_preprocessor.size={tuple(size)}, the size '
                'batches are padded to; make them equal')


# ----------------------------------------------------------------- model
def check_model(cfg: Config) -> nn.Module:
    """Build the model once, as the Runner will, and return it.

    Construction validates Mesa policies (unknown options, bit width, group
    counts against channels and attention heads) and every other constructor
    argument.

    Raises:
        UsageError: With the builder's message (which names the class).
    """
    from mmengine.registry import DefaultScope
    from mmseg.registry import MODELS
    model_cfg = copy.deepcopy(cfg.get('model'))
    if model_cfg is None:
        raise UsageError('the config has no model')
    scope = cfg.get('default_scope', 'mmseg')
    with DefaultScope.overwrite_default_scope(scope):
        try:
            model = MODELS.build(copy.deepcopy(model_cfg))
        except _CONFIG_ERRORS as e:
            raise UsageError(f'invalid model config '
                             f'({_failing_part(model_cfg)}): {e}') from None
    return model


# what constructors raise for bad arguments (mmengine's registry keeps the type)
_CONFIG_ERRORS = (ValueError, TypeError, KeyError, AssertionError)


def _failing_part(model_cfg: dict) -> str:
    """The config key of the first model part that fails to build alone
    ('model' when only the whole model fails, e.g. its own ``mesa``)."""
    from mmseg.registry import MODELS
    for part in ('backbone', 'neck', 'decode_head', 'auxiliary_head'):
        part_cfg = model_cfg.get(part)
        if not isinstance(part_cfg, dict):
            continue
        try:
            MODELS.build(copy.deepcopy(part_cfg))
        except _CONFIG_ERRORS:
            return f'model.{part}'
    return 'model'


# ------------------------------------------------------------ checkpoint
def check_checkpoint(model: nn.Module, path: str) -> None:
    """The checkpoint at ``path`` is readable and fits ``model`` (see
    :func:`mesa_seg.models.checkpoint.match_state_dict`).

    Raises:
        UsageError: Unreadable file, or the mismatching keys.
    """
    try:
        try:  # mmap: only the keys and shapes are read
            ckpt = torch.load(path, map_location='cpu', mmap=True,
                              weights_only=True)
        except RuntimeError as e:
            if 'mmap' not in str(e):
                raise
            ckpt = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # noqa: BLE001 - any reason it does not load
        raise UsageError(
            f'cannot read checkpoint {path} ({type(e).__name__}: '
            f'{str(e).splitlines()[0] if str(e) else ""}); truncated, or '
            'not a PyTorch checkpoint') from None
    state_dict = ckpt.get('state_dict', ckpt) if isinstance(ckpt, dict) \
        else None
    if not isinstance(state_dict, dict):
        raise UsageError(f'checkpoint {path} holds no state dict')
    try:
        match_state_dict(model, state_dict)
    except UsageError as e:
        raise type(e)(f'{path}: {e}') from None


def launch_world_size(launcher: str) -> int:
    """The number of ranks ``launcher`` starts, from its environment (before
    the process group exists)."""
    key = {'pytorch': 'WORLD_SIZE', 'slurm': 'SLURM_NTASKS'}.get(launcher)
    try:
        return int(os.environ.get(key, 1)) if key else 1
    except ValueError:
        return 1


def check_resume_world_size(cfg: Config, world_size: int) -> None:
    """Resuming continues the same run only on the same number of ranks:
    refuse another one unless
    ``default_hooks.checkpoint.allow_world_size_change`` (see
    :class:`mesa_seg.hooks.SafeCheckpointHook`).

    Raises:
        UsageError: The checkpoint was trained on another number of ranks.
    """
    path = checkpoint_to_load(cfg) if cfg.get('resume') else None
    hook = (cfg.get('default_hooks') or {}).get('checkpoint') or {}
    if not path or hook.get('allow_world_size_change'):
        return
    try:
        ckpt = torch.load(path, map_location='cpu', mmap=True,
                          weights_only=True)
    except Exception:  # noqa: BLE001 - check_checkpoint reports those
        return
    saved = ((ckpt.get('meta') or {}) if isinstance(ckpt, dict) else
             {}).get('world_size')
    if saved is not None and saved != world_size:
        from .hooks.safe_checkpoint_hook import world_size_message
        raise UsageError(world_size_message(path, saved, world_size))
