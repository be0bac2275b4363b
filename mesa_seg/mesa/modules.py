"""Drop-in Mesa modules: subclasses of the torch modules with identical
``state_dict`` keys (plus the quantizers' running-range buffers).

They run the Mesa op (:mod:`.ops`) only when it can save memory: in training
mode, with Mesa enabled and autograd recording. Otherwise (eval, ``no_grad``,
``mesa_enabled = False``) they run the plain torch op.
"""
from __future__ import annotations

import copy
from collections import OrderedDict
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import ops
from .config import QuantizerConfig
from .quantizer import ActivationQuantizer

__all__ = [
    'MatMul', 'MesaModule', 'MesaLinear', 'MesaConv2d', 'MesaLayerNorm', 'MesaGELU',
    'MesaSoftmax', 'MesaMatMul', 'MesaBatchNorm2d', 'MesaReLU',
]


class MatMul(nn.Module):
    """``a @ b`` as a module, so the Mesa converter can swap it (functional
    matmuls inside attention cannot be found by walking ``named_modules``)."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.matmul(a, b)


class MesaModule:
    """Mixin of all Mesa modules.

    Every Mesa module is built either from a torch module,
    ``from_float(module, config)``, or by its constructor:

    Args:
        *args, **kwargs: the torch class's own arguments (so ``groups`` of
            :class:`MesaConv2d` is the convolution's).
        mesa_config (QuantizerConfig, optional): options of the layer's
            quantizers (Mesa groups, momentum, rounding, ...). Default: None
            (``QuantizerConfig()``).
        enabled (bool): use Mesa in training (``mesa_enabled`` switches it
            later). Default: True.

    Subclasses define ``_float_type`` (the torch class they replace), ``_group_dim``
    (the channel/head axis of the compressed activation), ``_quantized`` (names
    of their :class:`ActivationQuantizer` submodules) and ``_head_axis`` (the
    groups split attention heads, whose count the layer cannot know).
    """
    _float_type: type = nn.Module
    _group_dim: int = -1
    _quantized: tuple = ('quantizer',)
    _head_axis: bool = False

    def __init__(self, *args, mesa_config: Optional[QuantizerConfig] = None,
                 enabled: bool = True, **kwargs):
        super().__init__(*args, **kwargs)  # the torch class's constructor
        self._init_mesa(mesa_config, enabled)

    def _init_mesa(self, config: Optional[QuantizerConfig] = None,
                   enabled: bool = True) -> None:
        config = QuantizerConfig() if config is None else config
        channels = self._channels()
        if channels is not None and channels % config.groups:
            raise ValueError(f'{type(self).__name__}: groups={config.groups} does not divide '
                             f'the {channels} channels of its input')
        self.mesa_enabled = enabled
        for name in self._quantized:
            self.add_module(name, ActivationQuantizer(config, self._group_dim))

    def _channels(self) -> Optional[int]:
        """Size of the grouped axis when known at construction (for validation)."""
        return None

    def _use_mesa(self, *inputs: torch.Tensor) -> bool:
        if not (self.mesa_enabled and self.training and torch.is_grad_enabled()):
            return False
        return (any(t.requires_grad for t in inputs)
                or any(p.requires_grad for p in self.parameters(recurse=False)))

    @classmethod
    def from_float(cls, module: nn.Module, config: Optional[QuantizerConfig] = None,
                   enabled: bool = True) -> nn.Module:
        """Mesa twin of ``module``: same parameters (shared, not copied), buffers,
        hooks and constructor options (eps, stride, approximate, ...).

        Args:
            module (nn.Module): an instance of ``cls._float_type``; left untouched.
            config (QuantizerConfig, optional): quantizer options. Default: None
                (``QuantizerConfig()``).
            enabled (bool): use Mesa in training. Default: True.

        Returns:
            nn.Module: the twin, an instance of both ``cls`` and ``type(module)``.
        """
        new = copy.copy(module)
        # copy.copy shares the submodule/buffer dicts; the twin adds entries to them.
        new._modules = OrderedDict(module._modules)
        new._buffers = OrderedDict(module._buffers)
        new.__class__ = cls
        new._init_mesa(config, enabled)
        return new

    def to_float(self) -> nn.Module:
        """The plain torch module (quantizers dropped), sharing the parameters."""
        plain = copy.copy(self)
        plain._modules = OrderedDict((k, v) for k, v in self._modules.items()
                                     if k not in self._quantized)
        plain._buffers = OrderedDict(self._buffers)
        plain.__class__ = self._float_type
        del plain.mesa_enabled
        return plain


class MesaLinear(MesaModule, nn.Linear):
    """:class:`torch.nn.Linear` storing its input in 8 bits (groups on channels).

    Constructor arguments: see :class:`MesaModule`.
    """
    _float_type = nn.Linear

    def _channels(self):
        return self.in_features

    def forward(self, x):
        if not self._use_mesa(x):
            return super().forward(x)
        return ops.linear(x, self.weight, self.bias, self.quantizer)


class MesaConv2d(MesaModule, nn.Conv2d):
    """:class:`torch.nn.Conv2d` storing its input in 8 bits (groups on channels).

    Constructor arguments: see :class:`MesaModule` (``groups`` is the
    convolution's; the Mesa groups are ``mesa_config.groups``). Zero padding
    given as a string that is not symmetric (``'same'`` with an even kernel
    extent) runs the plain op; the other padding modes pad first, as torch does.
    """
    _float_type = nn.Conv2d
    _group_dim = 1

    def _channels(self):
        return self.in_channels

    def _int_padding(self):
        if not isinstance(self.padding, str):
            return self.padding
        if self.padding == 'valid':
            return (0, 0)
        total = [d * (k - 1) for d, k in zip(self.dilation, self.kernel_size)]
        return None if any(t % 2 for t in total) else tuple(t // 2 for t in total)

    def forward(self, x):
        if not self._use_mesa(x):
            return super().forward(x)
        if self.padding_mode != 'zeros':
            # As torch's Conv2d: pad (any 'same' split included), then convolve
            # unpadded; the padded input is the one stored in 8 bits.
            x = ops.pad2d(x, self._reversed_padding_repeated_twice, self.padding_mode)
            padding = (0, 0)
        else:
            padding = self._int_padding()
            if padding is None:
                return super().forward(x)
        return ops.conv2d(x, self.weight, self.bias, self.stride, padding, self.dilation,
                          self.groups, self.quantizer)


class MesaLayerNorm(MesaModule, nn.LayerNorm):
    """:class:`torch.nn.LayerNorm` storing its input in 8 bits (groups on channels)."""
    _float_type = nn.LayerNorm

    def _channels(self):
        return self.normalized_shape[-1]

    def forward(self, x):
        if not self._use_mesa(x):
            return super().forward(x)
        return ops.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps,
                              self.quantizer)


class MesaGELU(MesaModule, nn.GELU):
    """:class:`torch.nn.GELU` storing its input in 8 bits (groups on the last dim)."""
    _float_type = nn.GELU

    def forward(self, x):
        if not self._use_mesa(x):
            return super().forward(x)
        return ops.gelu(x, self.approximate, self.quantizer)


class MesaSoftmax(MesaModule, nn.Softmax):
    """:class:`torch.nn.Softmax` storing its output in 8 bits, one group per head
    (dim 1 of ``(B, heads, N, N)`` attention scores)."""
    _float_type = nn.Softmax
    _group_dim = 1
    _head_axis = True

    def forward(self, x):
        if not self._use_mesa(x):
            return super().forward(x)
        dim = self.dim if self.dim is not None else F._get_softmax_dim('softmax', x.dim(), 3)
        return ops.softmax(x, dim, self.quantizer)


class MesaMatMul(MesaModule, MatMul):
    """:class:`MatMul` storing both operands in 8 bits, one group per head (dim 1
    of ``(B, heads, N, D)``); ``quantizer_a``/``quantizer_b`` hold their ranges."""
    _float_type = MatMul
    _group_dim = 1
    _head_axis = True
    _quantized = ('quantizer_a', 'quantizer_b')

    def forward(self, a, b):
        if not self._use_mesa(a, b) or a.dim() < 2 or b.dim() < 2:
            return super().forward(a, b)
        return ops.matmul(a, b, self.quantizer_a, self.quantizer_b)


class MesaBatchNorm2d(MesaModule, nn.BatchNorm2d):
    """:class:`torch.nn.BatchNorm2d` storing its input in 8 bits (groups on channels).

    Only batch-statistics (training) mode is compressed; running statistics are
    updated exactly as torch does.
    """
    _float_type = nn.BatchNorm2d
    _group_dim = 1

    def _channels(self):
        return self.num_features

    def forward(self, x):
        if not self._use_mesa(x):
            return super().forward(x)
        self._check_input_dim(x)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average, as torch does
                factor = 1.0 / float(self.num_batches_tracked)
        F._verify_batch_size(x.size())  # torch's error for one value per channel
        return ops.batch_norm(x, self.weight, self.bias, self.running_mean, self.running_var,
                              factor, self.eps, self.quantizer)


class MesaReLU(MesaModule, nn.ReLU):
    """:class:`torch.nn.ReLU` saving a 1-bit mask (no range, no quantizer: a
    ``mesa_config`` is accepted, for uniformity, and unused)."""
    _float_type = nn.ReLU
    _quantized = ()

    def forward(self, x):
        if not self._use_mesa(x):
            return super().forward(x)
        return ops.relu(x, self.inplace)
