"""Pure state-dict logic: conversions between checkpoint layouts, and
whether a checkpoint fits a model.

No file I/O and no logging, so the functions are shared by the backbones'
``init_weights``, the offline converters in ``tools/model_converters/``, the
pre-training check (:func:`mesa_seg.preflight.check_checkpoint`) and the
Runner's hook (:class:`mesa_seg.hooks.CheckpointCompatHook`), and are easy to
test. The conversions take and return plain ``{key: tensor}`` mappings;
:func:`match_state_dict` reads a model's ``state_dict`` keys and shapes.
"""
import math
import re
from collections import OrderedDict
from typing import Dict, List, Mapping, Sequence, Tuple

import torch
from torch import nn

from ..errors import CheckpointMismatchError
from ..mesa import QUANTIZER_ATTRS, RunningRange

StateDict = Dict[str, torch.Tensor]

_MAX_LISTED = 20  # keys listed in one error message

# Keys of the official ImageNet classification checkpoints that a dense
# prediction backbone has no use for: the classifier, PVT v1's class token and the final
# LayerNorm PVT v1 applies to that token (v2's per-stage norms are ``norm1``..``norm4``).
_PVT_CLASSIFIER_KEY = re.compile(r'^(head\.|cls_token$|norm\.)')


def unwrap_state_dict(checkpoint: Mapping) -> StateDict:
    """Return the model weights of a loaded checkpoint file.

    Accepts a bare state dict or one wrapped under ``'state_dict'`` (mmengine) or
    ``'model'`` (DeiT/PVT training scripts). A ``module.`` prefix (DDP) is removed.
    If the weights belong to a whole segmentor (keys ``backbone.*``), only the
    backbone's are kept, without the prefix.

    Args:
        checkpoint (Mapping): The object ``torch.load`` returned.

    Returns:
        dict: The backbone's state dict.
    """
    if 'state_dict' in checkpoint:
        checkpoint = checkpoint['state_dict']
    elif 'model' in checkpoint:
        checkpoint = checkpoint['model']
    state_dict = OrderedDict(
        (k[len('module.'):] if k.startswith('module.') else k, v)
        for k, v in checkpoint.items())
    if any(k.startswith('backbone.') for k in state_dict):
        state_dict = OrderedDict((k[len('backbone.'):], v)
                                 for k, v in state_dict.items()
                                 if k.startswith('backbone.'))
    return state_dict


def pvt_classification_to_backbone(
        state_dict: Mapping[str, torch.Tensor]) -> Tuple[StateDict, List[str]]:
    """Drop the classification-only parts of an official PVT / PVTv2 checkpoint.

    Removes ``head.*``, ``cls_token`` and PVT v1's final ``norm.*``, and cuts the
    class-token slot off a positional embedding whose token count is a square
    plus one (PVT v1's ``pos_embed4`` is ``1 + 7 * 7`` tokens at 224x224).

    Args:
        state_dict (Mapping[str, Tensor]): Official-layout weights.

    Returns:
        tuple[dict, list[str]]: The backbone weights and the names of what was
        removed (a sliced ``pos_embed`` is listed as ``'pos_embedN[:, 0]'``).
    """
    out, dropped = OrderedDict(), []
    for key, value in state_dict.items():
        if _PVT_CLASSIFIER_KEY.match(key):
            dropped.append(key)
            continue
        if re.fullmatch(r'pos_embed\d+', key) and value.dim() == 3:
            num_tokens = value.shape[1]
            if (not _is_square(num_tokens)) and _is_square(num_tokens - 1):
                value = value[:, 1:]
                dropped.append(f'{key}[:, 0]')
        out[key] = value
    return out, dropped


def is_timm_pvt_v2(state_dict: Mapping[str, torch.Tensor]) -> bool:
    """Whether ``state_dict`` uses timm's PVTv2 layout (``stages.N.blocks.M``)."""
    return 'patch_embed.proj.weight' in state_dict or any(
        k.startswith('stages.') for k in state_dict)


def timm_pvt_v2_to_official(
        state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """Rename timm's ``pvt_v2_*`` weights to the official PVTv2 layout.

    timm moves the stage-1 patch embedding to ``patch_embed``, later patch
    embeddings to ``stages.{i}.downsample``, blocks to ``stages.{i}.blocks.{j}``,
    per-stage norms to ``stages.{i}.norm`` and drops the ``DWConv`` wrapper
    (``mlp.dwconv`` instead of ``mlp.dwconv.dwconv``). Stages are 0-based in timm
    and 1-based in the official code. Tensors are not copied.

    Args:
        state_dict (Mapping[str, Tensor]): timm-layout weights.

    Returns:
        dict: Official-layout weights (``head.*`` kept as is).

    Raises:
        KeyError: If a key matches neither layout's known names.
    """
    rules = (
        (r'^patch_embed\.(.*)$', lambda m: f'patch_embed1.{m[1]}'),
        (r'^stages\.(\d+)\.downsample\.(.*)$',
         lambda m: f'patch_embed{int(m[1]) + 1}.{m[2]}'),
        (r'^stages\.(\d+)\.blocks\.(\d+)\.mlp\.dwconv\.(weight|bias)$',
         lambda m: f'block{int(m[1]) + 1}.{m[2]}.mlp.dwconv.dwconv.{m[3]}'),
        (r'^stages\.(\d+)\.blocks\.(\d+)\.(.*)$',
         lambda m: f'block{int(m[1]) + 1}.{m[2]}.{m[3]}'),
        (r'^stages\.(\d+)\.norm\.(.*)$',
         lambda m: f'norm{int(m[1]) + 1}.{m[2]}'),
        (r'^head\..*$', lambda m: m[0]),
    )
    out = OrderedDict()
    for key, value in state_dict.items():
        for pattern, rename in rules:
            match = re.match(pattern, key)
            if match:
                out[rename(match)] = value
                break
        else:
            raise KeyError(f'Unexpected key {key!r} in a timm PVTv2 state dict')
    return out


def _is_square(n: int) -> bool:
    return n > 0 and math.isqrt(n)**2 == n


# ---------------------------------------------------- checkpoint matching
def _is_quantizer_key(key: str) -> bool:
    """Whether ``key`` names a buffer of a Mesa quantizer (``<layer>.quantizer.
    running_min`` ...). Such buffers carry no weights; a layer the model runs
    in full precision (or functionally, like an attention matmul) ignores them.
    """
    parts = key.split('.')
    return len(parts) >= 3 and parts[-2] in QUANTIZER_ATTRS


def _quantizer_keys(model: nn.Module) -> set:
    return {
        f'{name}.{buf}' if name else buf
        for name, module in model.named_modules(remove_duplicate=False)
        if isinstance(module, RunningRange) for buf in module._buffers
    }


def _listing(what: str, keys: Sequence[str]) -> str:
    shown = ', '.join(keys[:_MAX_LISTED])
    more = f' ... and {len(keys) - _MAX_LISTED} more' \
        if len(keys) > _MAX_LISTED else ''
    return f'{len(keys)} {what}: {shown}{more}'


def match_state_dict(
    model: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    revise_keys: Sequence[Tuple[str, str]] = ((r'^module\.', ''), )
) -> Tuple[List[str], List[str]]:
    """Check that ``state_dict`` fits ``model`` up to Mesa's quantizer buffers.

    Allowed: missing quantizer buffers (a full-precision checkpoint loaded
    into a Mesa model: they initialise from the first training batch), extra
    quantizer buffers (a Mesa checkpoint loaded into a model without Mesa on
    those layers), missing BatchNorm ``num_batches_tracked`` (ignored by
    mmengine too).

    Args:
        model (nn.Module): The model (unwrapped from DDP).
        state_dict (Mapping): Checkpoint weights, keys as stored.
        revise_keys (Sequence[tuple[str, str]]): ``re.sub`` pairs applied to
            the stored keys before matching, as mmengine's loader does.
            Default: strip ``module.``.

    Returns:
        tuple[list[str], list[str]]: Extra quantizer keys *as stored* (to be
        dropped before loading) and the model's quantizer buffers the
        checkpoint lacks.

    Raises:
        CheckpointMismatchError: On any other missing or unexpected key or a
            shape mismatch; the message lists the keys.
    """
    revised: Dict[str, str] = {}
    for key in state_dict:
        new = key
        for pattern, repl in revise_keys:
            new = re.sub(pattern, repl, new)
        revised[new] = key
    expected = model.state_dict()
    quantizer_keys = _quantizer_keys(model)
    missing = [
        k for k in expected if k not in revised and k not in quantizer_keys
        and not k.endswith('num_batches_tracked')
    ]
    extra, unexpected = [], []
    for key in revised:
        if key not in expected:
            (extra if _is_quantizer_key(key) else unexpected).append(key)
    shapes = [
        f'{k} {tuple(state_dict[revised[k]].shape)} vs model '
        f'{tuple(expected[k].shape)}' for k in revised
        if k in expected and hasattr(state_dict[revised[k]], 'shape')
        and tuple(state_dict[revised[k]].shape) != tuple(expected[k].shape)
    ]
    problems = [
        _listing(what, keys)
        for what, keys in (('missing keys', missing),
                           ('unexpected keys', unexpected),
                           ('shape mismatches (checkpoint vs model)', shapes))
        if keys
    ]
    if problems:
        raise CheckpointMismatchError(
            'checkpoint does not fit the model (is it from another '
            'architecture or config?): ' + '; '.join(problems))
    absent = sorted(quantizer_keys - set(revised))
    return [revised[k] for k in extra], absent
