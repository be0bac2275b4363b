"""Which layers of a model get Mesa, and the call that converts them.

In the spirit of torchao's ``quantize_(model, config, filter_fn)``: a frozen
config (:class:`MesaPolicy`, also accepted as a plain dict from an mmengine
config) and one in-place transform, :func:`mesafy_`.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Callable, Dict, FrozenSet, Mapping, Optional, Tuple, Union

from torch import nn

from .attention import MesaMultiheadAttention
from .config import QuantizerConfig
from .modules import (MatMul, MesaBatchNorm2d, MesaConv2d, MesaGELU, MesaLayerNorm,
                      MesaLinear, MesaMatMul, MesaModule, MesaReLU, MesaSoftmax)
from .sync_batchnorm import MesaSyncBatchNorm

__all__ = ['MesaPolicy', 'LAYER_TYPES', 'QUANTIZER_ATTRS', 'mesafy_', 'set_mesa_enabled',
           'mesa_modules']

#: policy layer name -> (torch class converted, its Mesa twin)
LAYER_TYPES: Dict[str, Tuple[type, type]] = {
    'Linear': (nn.Linear, MesaLinear),
    'Conv2d': (nn.Conv2d, MesaConv2d),
    'LayerNorm': (nn.LayerNorm, MesaLayerNorm),
    'GELU': (nn.GELU, MesaGELU),
    'Softmax': (nn.Softmax, MesaSoftmax),
    'MatMul': (MatMul, MesaMatMul),
    'BatchNorm2d': (nn.BatchNorm2d, MesaBatchNorm2d),
    'SyncBatchNorm': (nn.SyncBatchNorm, MesaSyncBatchNorm),
    'ReLU': (nn.ReLU, MesaReLU),
    'MultiheadAttention': (nn.MultiheadAttention, MesaMultiheadAttention),
}
LAYER_TYPES_BY_CLASS = {float_cls: mesa_cls for float_cls, mesa_cls in LAYER_TYPES.values()}
#: attribute names of the quantizer submodules over all Mesa layer types: a
#: state_dict key ``<layer>.<one of these>.<buffer>`` is Mesa state, not a weight
QUANTIZER_ATTRS: FrozenSet[str] = frozenset(
    name for _, mesa_cls in LAYER_TYPES.values() for name in mesa_cls._quantized)
SUPPORTED_BITS = (8,)
GROUP_MODES = ('heads', 'channels')


@dataclass(frozen=True)
class MesaPolicy:
    """What :func:`mesafy_` converts, and how.

    Args:
        enabled (bool): False leaves the model untouched (plain FP32 training).
            Default: True.
        layers (tuple[str]): layer types to convert, keys of ``LAYER_TYPES``.
            Default: all.
        include (tuple[str]): regexes; if given, only modules whose qualified
            name matches one (``re.search``) are converted. Default: ().
        exclude (tuple[str]): regexes of module names never converted. Default: ().
        groups (int | str): quantization groups along the channel/head axis.
            ``'heads'``: the ``num_heads`` of the innermost enclosing module that
            has one (the module itself included), 1 where none has.
            ``'channels'``: one group per input channel for layers that declare
            their channels (Linear, Conv2d, LayerNorm, BatchNorm2d,
            SyncBatchNorm; the in-projection inputs of MultiheadAttention), 1
            for the others — suits conv heads, where BatchNorm's per-channel statistics
            over few pixels (e.g. pooled 1x1 maps) need per-channel ranges.
            An int must divide the channels of each converted layer that
            declares them, and, for attention Softmax/MatMul (grouped by head),
            the innermost enclosing ``num_heads``. Default: 'heads'.
        bits (int): stored bits; only 8 is supported. Default: 8.
        momentum (float), stochastic_rounding (bool), sync_stats (bool),
        widen_to_batch (bool): the options of every converted layer's
            quantizers, documented on :class:`QuantizerConfig`, whose defaults
            (the paper's) they take.
    """
    enabled: bool = True
    layers: Tuple[str, ...] = tuple(LAYER_TYPES)
    include: Tuple[str, ...] = ()
    exclude: Tuple[str, ...] = ()
    groups: Union[int, str] = 'heads'
    bits: int = 8
    momentum: float = QuantizerConfig.momentum
    stochastic_rounding: bool = QuantizerConfig.stochastic_rounding
    sync_stats: bool = QuantizerConfig.sync_stats
    widen_to_batch: bool = QuantizerConfig.widen_to_batch

    def __post_init__(self):
        for name in ('layers', 'include', 'exclude'):
            value = getattr(self, name)
            if isinstance(value, str):
                value = (value,)
            object.__setattr__(self, name, tuple(value))
        unknown = [t for t in self.layers if t not in LAYER_TYPES]
        if unknown:
            raise ValueError(f'Mesa policy: unknown layer type(s) {unknown}; '
                             f'choose from {list(LAYER_TYPES)}')
        if self.groups not in GROUP_MODES and not (isinstance(self.groups, int)
                                                   and self.groups >= 1):
            raise ValueError(f'Mesa policy: groups must be a positive int or one of '
                             f'{GROUP_MODES}, got {self.groups!r}')
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(f'Mesa policy: bits={self.bits} is not supported; Mesa stores '
                             f'activations as uint8 (bits must be one of {SUPPORTED_BITS})')
        try:  # the quantizer options are validated where they are defined
            self.quantizer_config(groups=1)
        except ValueError as err:
            raise ValueError(f'Mesa policy: {err}') from None
        for pattern in self.include + self.exclude:
            try:
                re.compile(pattern)
            except re.error as err:
                raise ValueError(f'Mesa policy: bad regex {pattern!r}: {err}') from None

    @classmethod
    def from_cfg(cls, cfg: Union['MesaPolicy', Mapping, None]) -> 'MesaPolicy':
        """Build from a policy, a plain (config) dict, or None (= defaults)."""
        if cfg is None:
            return cls()
        if isinstance(cfg, cls):
            return cfg
        if not isinstance(cfg, Mapping):
            raise TypeError(f'Mesa policy must be a dict or MesaPolicy, got {type(cfg).__name__}')
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(cfg) - known)
        if unknown:
            raise ValueError(f'Mesa policy: unknown option(s) {unknown}; valid options are '
                             f'{sorted(known)}')
        return cls(**dict(cfg))

    @classmethod
    def from_arg(cls, mesa: Union['MesaPolicy', Mapping, None],
                 defaults: Optional[Mapping] = None) -> 'MesaPolicy':
        """Policy from a model's ``mesa=`` argument (backbones, segmentors).

        None means no Mesa (FP32); a dict updates the model's ``defaults``
        (e.g. which layers its recipe keeps in full precision); a
        ``MesaPolicy`` is used as given.
        """
        if mesa is None:
            return cls(enabled=False)
        if isinstance(mesa, Mapping):
            return cls.from_cfg({**(defaults or {}), **mesa})
        if isinstance(mesa, cls):
            return mesa
        raise TypeError(f'mesa must be a dict, a MesaPolicy or None, got {type(mesa).__name__}')

    def quantizer_config(self, groups: int) -> QuantizerConfig:
        """The quantizer options of a converted layer, given its resolved
        ``groups`` (the policy's ``groups`` may be a mode, resolved per layer)."""
        return QuantizerConfig(groups=groups, momentum=self.momentum,
                               stochastic_rounding=self.stochastic_rounding,
                               sync_stats=self.sync_stats,
                               widen_to_batch=self.widen_to_batch)

    def selects(self, name: str) -> bool:
        """Whether the include/exclude patterns select module ``name``."""
        if self.include and not any(re.search(p, name) for p in self.include):
            return False
        return not any(re.search(p, name) for p in self.exclude)


def _innermost_heads(name: str, heads: Dict[str, int]) -> Optional[Tuple[str, int]]:
    """``(owner, num_heads)`` of the innermost module enclosing ``name`` (itself
    included) that has an int ``num_heads``; None where none has."""
    parts = name.split('.') if name else []
    for depth in range(len(parts), -1, -1):
        owner = '.'.join(parts[:depth])
        if owner in heads:
            return owner, heads[owner]
    return None


def _resolve_groups(policy: MesaPolicy, module: nn.Module, name: str,
                    heads: Dict[str, int]) -> int:
    if isinstance(policy.groups, int):
        return policy.groups
    if policy.groups == 'channels':
        mesa_cls = LAYER_TYPES_BY_CLASS[type(module)]
        return mesa_cls._channels(module) or 1
    found = _innermost_heads(name, heads)
    return 1 if found is None else found[1]


def _check_head_groups(mesa_cls: type, groups: int, name: str,
                       heads: Dict[str, int], root: nn.Module) -> None:
    """Head-axis layers (attention scores, softmax) see their head count only in
    the forward pass; their groups must divide the enclosing module's heads."""
    if not mesa_cls._head_axis:
        return
    found = _innermost_heads(name, heads)
    if found is not None and found[1] % groups:
        owner, count = found
        raise ValueError(f'groups={groups} does not divide the {count} attention heads of '
                         f'{owner or type(root).__name__}')


def mesafy_(model: nn.Module, policy: Union[MesaPolicy, Mapping, None] = None,
            filter_fn: Optional[Callable[[nn.Module, str], bool]] = None) -> nn.Module:
    """Swap the layers ``policy`` selects for their Mesa twins, in place.

    Parameters are shared (not copied), so outputs stay identical and existing
    references (e.g. an optimizer) remain valid; torch's ``state_dict`` keys are
    kept, plus each quantizer's ``running_min``/``running_range``/``initialized``.
    Each layer gets ``policy.quantizer_config(groups)`` with its resolved groups.

    Args:
        model (nn.Module): the model (or any submodule tree).
        policy (MesaPolicy | dict | None): see :class:`MesaPolicy`. Default: None.
        filter_fn (callable, optional): ``filter_fn(module, qualified_name)``
            returning False keeps a layer in full precision. Default: None.

    Returns:
        nn.Module: ``model`` (the root itself is replaced only when it is a
        convertible layer, so use the return value).

    Raises:
        ValueError: a layer cannot take the policy's groups: they do not divide
            its channels, or (attention scores, softmax) the ``num_heads`` of
            the innermost enclosing module that has one.
    """
    policy = MesaPolicy.from_cfg(policy)
    if not policy.enabled:
        return model
    by_type = {LAYER_TYPES[t][0]: LAYER_TYPES[t] for t in policy.layers}
    heads = {name: mod.num_heads for name, mod in model.named_modules()
             if isinstance(getattr(mod, 'num_heads', None), int)}

    def convert(module: nn.Module, name: str) -> nn.Module:
        # Exact type match: subclasses may override forward in ways we cannot see.
        spec = by_type.get(type(module))
        if spec is None or not policy.selects(name):
            return module
        if filter_fn is not None and not filter_fn(module, name):
            return module
        mesa_cls = spec[1]
        groups = _resolve_groups(policy, module, name, heads)
        try:
            _check_head_groups(mesa_cls, groups, name, heads, model)
            return mesa_cls.from_float(module, policy.quantizer_config(groups))
        except ValueError as err:
            raise ValueError(f"Mesa: cannot convert '{name or type(module).__name__}': "
                             f'{err}') from None

    converted: Dict[int, nn.Module] = {}  # a shared layer stays shared
    for parent_name, parent in list(model.named_modules()):
        # Not named_children(): it skips a child registered twice in one parent.
        for child_name, child in list(parent._modules.items()):
            if child is None:
                continue
            full = f'{parent_name}.{child_name}' if parent_name else child_name
            new = converted.get(id(child)) or convert(child, full)
            if new is not child:
                converted[id(child)] = new
                setattr(parent, child_name, new)
    return convert(model, '')


def mesa_modules(model: nn.Module):
    """``(name, module)`` for every Mesa module in ``model``."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, MesaModule)]


def set_mesa_enabled(model: nn.Module, enabled: bool) -> int:
    """Turn Mesa on/off in every converted layer; returns how many were switched.
    Disabled layers run the plain torch op (and save full-precision tensors)."""
    found = mesa_modules(model)
    for _, module in found:
        module.mesa_enabled = bool(enabled)
    return len(found)
