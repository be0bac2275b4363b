"""The per-layer activation quantizer: grouping + running range + (de)quantize."""
from __future__ import annotations

from typing import NamedTuple, Tuple

import torch

from .observer import RunningRange
from .primitives import dequantize, group_view, quantize

__all__ = ['ActivationQuantizer', 'Packed']

_SEED_MOD = 2**31 - 1
_STEP_STRIDE = 1_000_003  # a prime: consecutive steps land far apart in seed space


class Packed(NamedTuple):
    """An activation stored for backward: uint8 codes plus per-group range."""
    q: torch.Tensor       # uint8, grouped view (outer, groups, inner)
    lo: torch.Tensor      # float32 (groups,)
    rng: torch.Tensor     # float32 (groups,)

    @property
    def tensors(self) -> Tuple[torch.Tensor, ...]:
        return tuple(self)


class ActivationQuantizer(RunningRange):
    """Compresses one activation of a layer to 8 bits for backward.

    Args:
        groups (int): contiguous groups along ``dim`` (heads for attention
            tensors). Default: 1.
        dim (int): the channel/head axis of the activation. Default: -1.
        momentum (float): EMA momentum of the running range. Default: 0.9.
        stochastic (bool): stochastic rounding (unbiased); round-to-nearest
            otherwise. Default: True.
        sync (bool): all-reduce statistics across ranks. Default: False.
        widen (bool): widen the running range to cover each batch (no
            saturation). Default: False.
    """

    def __init__(self, groups: int = 1, dim: int = -1, momentum: float = 0.9,
                 stochastic: bool = True, sync: bool = False, widen: bool = False):
        super().__init__(groups, momentum, sync, widen)
        self.dim = dim
        self.stochastic = stochastic
        # Stochastic-rounding seeds come from (salt, step), not from torch's global
        # RNG: activation checkpointing recomputes blocks with Mesa on after a
        # forward with Mesa off, and drawing from the global RNG there would change
        # the recomputed dropout/drop-path masks (wrong gradients). As buffers they
        # are checkpointed, so a resumed run rounds exactly as an uninterrupted one.
        salt = int(torch.randint(0, _SEED_MOD, ()))  # deterministic under the build seed
        self.register_buffer('rounding_salt', torch.tensor(salt, dtype=torch.int64))
        self.register_buffer('rounding_step', torch.tensor(0, dtype=torch.int64))

    def extra_repr(self) -> str:
        return f'{super().extra_repr()}, dim={self.dim}, stochastic={self.stochastic}'

    @torch.no_grad()
    def pack(self, x: torch.Tensor) -> Packed:
        """Quantize ``x`` (updating the running range in training mode)."""
        x3 = group_view(x, self.groups, self.dim)
        lo, rng = self(x3, update=self.training)
        seed = self._next_seed() if self.stochastic else None
        return Packed(quantize(x3, lo, rng, seed), lo, rng)

    def _next_seed(self) -> torch.Tensor:
        self.rounding_step.add_(1)  # on the device: no host synchronisation
        return (self.rounding_step * _STEP_STRIDE + self.rounding_salt) % _SEED_MOD

    @staticmethod
    def unpack(packed: Packed, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
        """Dequantize to a contiguous tensor of ``shape`` and ``dtype``."""
        return dequantize(packed.q, packed.lo, packed.rng, dtype).view(shape)
