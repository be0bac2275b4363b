"""Input checks that run before anything is built or written.

``tools/train.py`` and ``tools/test.py`` call :func:`check_inputs` after
:mod:`mesa_seg.apis` has checked paths (config, data root, work dir). Every
problem is a one-line :class:`~mesa_seg.apis.UsageError` (exit 2), raised
before the Runner creates its log folder:

- datasets (once :func:`mesa_seg.apis.check_data` has found the folders and
  paired images with annotations): files decode, annotations are
  single-channel label maps of the image's size, with values inside the class
  range (:func:`check_dataset`);
- the train crop fits the images the resize step can produce and the model's
  input size (:func:`check_train_crop`);
- the model config builds (unknown Mesa option, unsupported bit width, group
  count not dividing channels or heads, ...) (:func:`check_model`);
- the checkpoint to load or resume fits that model (:func:`check_checkpoint`).
"""
from __future__ import annotations

import copy
import os.path as osp
from typing import Optional, Sequence, Tuple

import numpy as np
import torch
from mmengine.config import Config
from mmengine.logging import print_log
from PIL import Image
from torch import nn

from .apis import UsageError, _datasets
from .mesa import MesaModule
from .resilience import match_state_dict

__all__ = [
    'DataError', 'check_inputs', 'check_dataset', 'check_train_crop',
    'check_model', 'check_checkpoint', 'checkpoint_to_load', 'CONTENT_CHECK_LIMIT'
]

#: Datasets up to this many images get every image and annotation decoded
#: (about 5 ms a pair); larger ones get headers only (~0.2 ms a pair) and
#: their labels are checked per batch by ``LabelRangeHook``.
CONTENT_CHECK_LIMIT = 1000
_MAX_LABELS = 5  # bad label values named in a message
_LABEL_MODES = ('1', 'L', 'P', 'I', 'I;16')


class DataError(UsageError):
    """A dataset that cannot be trained or evaluated on as it is."""


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
    # mesa_seg.apis.check_data
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
    counts against channels) and every other constructor argument; the head
    count of attention tensors is checked here too, since Mesa sees those
    tensors only in the forward pass.

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
    _check_head_groups(model)
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


def _check_head_groups(model: nn.Module) -> None:
    heads = {
        name: module.num_heads
        for name, module in model.named_modules()
        if isinstance(getattr(module, 'num_heads', None), int)
    }
    for name, module in model.named_modules():
        # head-axis layers (attention scores, softmax) do not know their size
        # before the forward pass; their groups split the heads
        if not isinstance(module, MesaModule) or module._group_dim != 1 or \
                module._channels() is not None:
            continue
        parts = name.split('.')
        count = next((heads[p] for p in ('.'.join(parts[:d])
                                         for d in range(len(parts), -1, -1))
                      if p in heads), None)
        for qname in module._quantized:
            groups = getattr(module, qname).groups
            if count is not None and count % groups:
                raise UsageError(
                    f'invalid model config: Mesa groups={groups} does not '
                    f'divide the {count} attention heads of {name}')


# ------------------------------------------------------------ checkpoint
def check_checkpoint(model: nn.Module, path: str) -> None:
    """The checkpoint at ``path`` is readable and fits ``model`` (see
    :func:`mesa_seg.resilience.match_state_dict`).

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
