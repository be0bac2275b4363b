"""Running-estimate quantization ranges (Mesa's "running estimates"), as buffers.

Like torch's ``MovingAverageMinMaxObserver``: state lives in buffers, so it is
saved in ``state_dict``, moves with ``.to()``, and is ignored by optimizers and
by DDP's gradient sync. Per group, in every training forward and *before* the
batch is quantized::

    first batch:  beta = min,  alpha = max - min
    afterwards:   beta  <- m * beta  + (1 - m) * min
                  alpha <- m * alpha + (1 - m) * (max - min)       (m = momentum)

With ``widen_to_batch`` the range used for *this batch* is the running range
widened to cover the batch's own min/max (the estimates stay the plain EMA
above), so no value saturates. Conv heads trained from scratch need it: their activations grow
faster than the EMA follows, and groups with few values (pooled 1x1 maps) swing
past it every step; clipped there, up to half of a layer's stored inputs
saturated and the gradients stopped tracking FP32's.

Non-finite statistics (a NaN/Inf activation) never enter the estimates: the
group keeps its previous range, and the range *returned for this batch* is NaN,
so its dequantized copy is NaN and the gradient shows the fault instead of a
silently clipped, plausible value. The forward output is exact either way.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn

from .config import QuantizerConfig
from .primitives import batch_min_max

__all__ = ['RunningRange']


class RunningRange(nn.Module):
    """EMA of per-group minimum (``running_min``) and range (``running_range``).

    Args:
        config (QuantizerConfig, optional): ``groups``, ``momentum`` (``m``
            above), ``sync_stats`` and ``widen_to_batch`` are used. Default:
            None (``QuantizerConfig()``).
    """

    def __init__(self, config: Optional[QuantizerConfig] = None):
        super().__init__()
        self.config = QuantizerConfig() if config is None else config
        groups = self.config.groups
        self.register_buffer('running_min', torch.zeros(groups))
        self.register_buffer('running_range', torch.zeros(groups))
        # Per group, so a group first seen with non-finite values still initialises
        # from the first finite batch.
        self.register_buffer('initialized', torch.zeros(groups, dtype=torch.bool))

    @property
    def groups(self) -> int:
        """Number of groups (the length of every buffer)."""
        return self.config.groups

    def extra_repr(self) -> str:
        return ', '.join(f'{f.name}={getattr(self.config, f.name)!r}'
                         for f in dataclasses.fields(self.config))

    @torch.no_grad()
    def forward(self, x3: torch.Tensor, update: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
        """Return ``(lo, rng)`` to quantize the grouped view ``x3`` with.

        With ``update`` the estimates first absorb this batch's statistics (call
        it so only in training forward). No host synchronisation.
        """
        return self.from_min_max(*batch_min_max(x3), update=update)

    @torch.no_grad()
    def from_min_max(self, bmin: torch.Tensor, bmax: torch.Tensor,
                     update: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
        """:meth:`forward` from this batch's per-group minimum and maximum,
        float32 ``(groups,)`` (for an activation held in pieces)."""
        if self.config.sync_stats and dist.is_available() and dist.is_initialized():
            dist.all_reduce(bmin, op=dist.ReduceOp.MIN)
            dist.all_reduce(bmax, op=dist.ReduceOp.MAX)
        brange = bmax - bmin
        finite = torch.isfinite(bmin) & torch.isfinite(bmax)
        if update:
            m = self.config.momentum
            ema_min = torch.where(self.initialized, m * self.running_min + (1 - m) * bmin, bmin)
            ema_range = torch.where(self.initialized,
                                    m * self.running_range + (1 - m) * brange, brange)
            self.running_min.copy_(torch.where(finite, ema_min, self.running_min))
            self.running_range.copy_(torch.where(finite, ema_range, self.running_range))
            self.initialized.logical_or_(finite)
        nan = torch.full_like(bmin, float('nan'))
        # Uninitialised groups (eval of a fresh module) fall back to this batch's range.
        lo = torch.where(self.initialized, self.running_min, bmin)
        rng = torch.where(self.initialized, self.running_range, brange)
        if self.config.widen_to_batch:
            hi = torch.maximum(lo + rng, bmax)
            lo = torch.minimum(lo, bmin)
            rng = hi - lo
        return torch.where(finite, lo, nan), torch.where(finite, rng, nan)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict,
                              missing_keys, unexpected_keys, error_msgs):
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict,
                                      missing_keys, unexpected_keys, error_msgs)
        # A plain torch / FP32 checkpoint has no estimates: they initialise from the
        # first training batch, so their absence is not an error even when strict.
        for name in self._buffers:
            key = prefix + name
            if key in missing_keys:
                missing_keys.remove(key)
