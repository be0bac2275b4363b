"""The per-layer activation quantizer: grouping + running range + (de)quantize."""
from __future__ import annotations

from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch

from .config import QuantizerConfig
from .observer import RunningRange
from .primitives import batch_min_max, dequantize, group_view, quantize

__all__ = ['ActivationQuantizer', 'Packed', 'pack_softmax_input']

_SEED_MOD = 2**31 - 1
_STEP_STRIDE = 1_000_003  # a prime: consecutive steps land far apart in seed space
_RANK_STRIDE = 104_729  # another prime: each data-parallel rank its own seeds


def _rank() -> int:
    """This process's rank in the default process group (0 without one)."""
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


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
        config (QuantizerConfig, optional): the options (groups, running-range
            momentum, rounding, ...). Default: None (``QuantizerConfig()``).
        dim (int): the channel/head axis of the activation, along which the
            ``config.groups`` groups lie. Default: -1.
    """

    def __init__(self, config: Optional[QuantizerConfig] = None, dim: int = -1):
        super().__init__(config)
        self.dim = dim
        # Stochastic-rounding seeds come from (salt, step), not from torch's global
        # RNG: activation checkpointing recomputes blocks with Mesa on after a
        # forward with Mesa off, and drawing from the global RNG there would change
        # the recomputed dropout/drop-path masks (wrong gradients). As buffers they
        # are checkpointed, so a resumed run rounds exactly as an uninterrupted one.
        # The rank enters the seed at run time (_next_seed): every rank holds the
        # same salt and step, and identical noise on all ranks would be correlated
        # across the global batch instead of averaging out. Rank 0 (and a single
        # process) gets the seeds it always had.
        salt = int(torch.randint(0, _SEED_MOD, ()))  # deterministic under the build seed
        self.register_buffer('rounding_salt', torch.tensor(salt, dtype=torch.int64))
        self.register_buffer('rounding_step', torch.tensor(0, dtype=torch.int64))

    def extra_repr(self) -> str:
        return f'{super().extra_repr()}, dim={self.dim}'

    @torch.no_grad()
    def pack(self, x: torch.Tensor) -> Packed:
        """Quantize ``x`` (updating the running range in training mode)."""
        x3 = group_view(x, self.groups, self.dim)
        lo, rng = self(x3, update=self.training)
        seed = self._next_seed() if self.config.stochastic_rounding else None
        return Packed(quantize(x3, lo, rng, seed), lo, rng)

    @torch.no_grad()
    def block_ranges(self, blocks: Sequence[torch.Tensor]
                     ) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        """``(lo, rng)`` of each block of an activation held as consecutive
        blocks along ``dim``, each at its own size (e.g. the low-resolution maps
        a concatenation upsamples): one running-range update over all of them,
        as :meth:`pack` makes for their concatenation (updating in training
        mode). Every block must hold whole groups; quantize each with
        :meth:`pack_with`."""
        dim = self.dim
        per_group = sum(b.shape[dim] for b in blocks) // self.groups
        if per_group == 0 or any(b.shape[dim] % per_group for b in blocks):
            raise ValueError(f'Mesa: blocks of {[b.shape[dim] for b in blocks]} channels do '
                             f'not each hold whole groups of {self.groups} groups')
        stats = [batch_min_max(group_view(b, b.shape[dim] // per_group, dim)) for b in blocks]
        lo, rng = self.from_min_max(torch.cat([s[0] for s in stats]),
                                    torch.cat([s[1] for s in stats]), update=self.training)
        ranges, g0 = [], 0
        for bmin, _ in stats:
            g1 = g0 + bmin.numel()
            ranges.append((lo[g0:g1], rng[g0:g1]))
            g0 = g1
        return ranges

    @torch.no_grad()
    def pack_with(self, x: torch.Tensor, lo: torch.Tensor, rng: torch.Tensor) -> Packed:
        """Quantize ``x`` with a given range (one of :meth:`block_ranges`)."""
        x3 = group_view(x, lo.numel(), self.dim)
        seed = self._next_seed() if self.config.stochastic_rounding else None
        return Packed(quantize(x3, lo, rng, seed), lo, rng)

    def _next_seed(self) -> torch.Tensor:
        self.rounding_step.add_(1)  # on the device: no host synchronisation
        return (self.rounding_step * _STEP_STRIDE + self.rounding_salt
                + _rank() * _RANK_STRIDE) % _SEED_MOD

    @staticmethod
    def unpack(packed: Packed, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
        """Dequantize to a contiguous tensor of ``shape`` and ``dtype``."""
        return dequantize(packed.q, packed.lo, packed.rng, dtype).reshape(shape)


@torch.no_grad()
def pack_softmax_input(scores: torch.Tensor) -> Packed:
    """8-bit copy of ``scores`` whose softmax is taken along dim 0 (e.g. one
    image's ``(classes, H, W)`` logits), one group per position.

    Each position's range is its own minimum to maximum, taken from the tensor
    (not a running estimate: a pixel's class scores are a new distribution
    every batch), so nothing saturates and the top score, which dominates the
    softmax, is stored exactly (code 255, up to float32 rounding); rounding is
    to nearest, since the softmax is nonlinear in the scores and unbiased
    rounding would not make it unbiased. A narrower range that let the
    lowest scores saturate would look harmless (their weight is tiny) but is
    not: for a confident pixel the loss gradient *is* the sum of those tiny
    weights. :meth:`ActivationQuantizer.unpack` restores ``scores.shape``.
    """
    x3 = scores.reshape(scores.shape[0], -1, 1)  # (classes, positions, 1)
    lo, hi = batch_min_max(x3)
    rng = hi - lo
    return Packed(quantize(x3, lo, rng), lo, rng)
