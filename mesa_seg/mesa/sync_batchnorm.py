"""``MesaSyncBatchNorm``: torch's ``SyncBatchNorm`` saving its input in 8 bits.

The distributed training path repeats torch's own autograd Function
(``torch/nn/modules/_functions.py``, ``SyncBatchNorm``) call for call, so the
output and the running statistics are bit-identical to torch's:

* forward: ``batch_norm_stats`` of the local batch, ``all_gather`` of
  ``[mean, invstd, count]``, ``batch_norm_gather_stats_with_counts`` (global
  statistics + running-stat update), ``batch_norm_elemt``;
* it saves the 8-bit input (``ActivationQuantizer.pack``) plus the per-channel
  global mean/invstd and the per-rank counts, where torch saves the input;
* backward: ``batch_norm_backward_reduce`` on the dequantized input, one
  ``all_reduce`` of ``[sum_dy, sum_dy_xmu]``, ``batch_norm_backward_elemt``.

Without a process group of more than one rank, or outside training, it falls
back as torch's module does: to (Mesa) batch norm on the local batch, or to
torch's plain forward.

torch implements these five kernels for CUDA only, and its ``SyncBatchNorm``
refuses CPU input. :class:`CpuKernels` gives them on CPU, with the formulas of
the CUDA kernels, so gloo runs on CPU (tests, CPU-only clusters) can sync
batch statistics too.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.autograd import Function

from . import ops
from .modules import MesaModule
from .quantizer import ActivationQuantizer, Packed

__all__ = ['MesaSyncBatchNorm', 'CpuKernels', 'sync_batch_norm']


# ------------------------------------------------------------------ kernels
def _channel_view(t: torch.Tensor, ndim: int) -> torch.Tensor:
    return t.view(1, -1, *([1] * (ndim - 2)))


def _reduce_dims(x: torch.Tensor) -> Tuple[int, ...]:
    return (0, *range(2, x.dim()))


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    # The CUDA kernels accumulate in float (double for double inputs).
    return torch.float64 if dtype == torch.float64 else torch.float32


class CpuKernels:
    """CPU versions of torch's CUDA-only sync-BN kernels, with torch's names
    and signatures (``torch.batch_norm_stats``, ...) and the CUDA kernels'
    formulas and accumulation dtype."""

    @staticmethod
    def batch_norm_stats(x: torch.Tensor, eps: float):
        var, mean = torch.var_mean(x.to(_acc_dtype(x.dtype)), dim=_reduce_dims(x),
                                   correction=0)
        return mean, (var + eps).rsqrt()

    @staticmethod
    def batch_norm_gather_stats_with_counts(x, mean_all, invstd_all, running_mean,
                                            running_var, momentum: float, eps: float,
                                            counts):
        # Chan et al.'s pairwise merge, one rank after the other, as the CUDA kernel.
        mean = torch.zeros_like(mean_all[0])
        m2 = torch.zeros_like(mean_all[0])
        n = torch.zeros((), dtype=mean.dtype, device=mean.device)
        for rank_mean, rank_invstd, count in zip(mean_all, invstd_all,
                                                 counts.to(mean.dtype)):
            rank_m2 = (rank_invstd.reciprocal().square() - eps) * count
            factor = 1.0 / (n + count)
            m2 = m2 + rank_m2 + (mean - rank_mean).square() * n * count * factor
            mean = n * factor * mean + count * factor * rank_mean
            n = n + count
        if running_mean is not None:
            running_mean.copy_((1 - momentum) * running_mean + momentum * mean)
        if running_var is not None:
            unbiased = m2 / (n - 1)
            running_var.copy_((1 - momentum) * running_var + momentum * unbiased)
        return mean, (m2 / n + eps).rsqrt()

    @staticmethod
    def batch_norm_elemt(x, weight, bias, mean, invstd, eps: float):
        acc = _acc_dtype(x.dtype)
        scale = invstd if weight is None else invstd * weight.to(acc)
        y = (x.to(acc) - _channel_view(mean, x.dim())) * _channel_view(scale, x.dim())
        if bias is not None:
            y = y + _channel_view(bias.to(acc), x.dim())
        return y.to(x.dtype)

    @staticmethod
    def batch_norm_backward_reduce(grad_out, x, mean, invstd, weight, input_g: bool,
                                   weight_g: bool, bias_g: bool):
        acc, dims = _acc_dtype(x.dtype), _reduce_dims(x)
        gy = grad_out.to(acc)
        sum_dy = gy.sum(dims)
        sum_dy_xmu = (gy * (x.to(acc) - _channel_view(mean, x.dim()))).sum(dims)
        param_dtype = x.dtype if weight is None else weight.dtype
        return (sum_dy if input_g else None, sum_dy_xmu if input_g else None,
                (sum_dy_xmu * invstd).to(param_dtype) if weight_g else None,
                sum_dy.to(param_dtype) if bias_g else None)

    @staticmethod
    def batch_norm_backward_elemt(grad_out, x, mean, invstd, weight, sum_dy, sum_dy_xmu,
                                  count):
        acc, ndim = _acc_dtype(x.dtype), x.dim()
        norm = 1.0 / count.sum().to(acc)
        mean_dy, mean_dy_xmu = sum_dy * norm, sum_dy_xmu * norm
        scale = invstd if weight is None else invstd * weight.to(acc)
        gx = (grad_out.to(acc) - _channel_view(mean_dy, ndim)
              - (x.to(acc) - _channel_view(mean, ndim))
              * _channel_view(invstd.square() * mean_dy_xmu, ndim))
        return (gx * _channel_view(scale, ndim)).to(x.dtype)


def _kernels(device: torch.device):
    return CpuKernels if device.type == 'cpu' else torch


# ---------------------------------------------------------------- autograd op
def _memory_format(x: torch.Tensor) -> torch.memory_format:
    """The layout torch's kernels saw (the input is contiguous or channels-last)."""
    if x.is_contiguous():
        return torch.contiguous_format
    return torch.channels_last if x.dim() == 4 else torch.channels_last_3d


def _channels_last(x: torch.Tensor) -> bool:
    return (x.is_contiguous(memory_format=torch.channels_last)
            or x.is_contiguous(memory_format=torch.channels_last_3d))


def _gather_stats(combined: torch.Tensor, channels: int, group, world_size: int):
    """``[mean, invstd, count]`` of every rank: ``(world_size, C)`` x 2 and
    ``(world_size, 1)``, with torch's collective for the backend."""
    if group._get_backend_name() != 'gloo':  # gloo lacks the single-tensor all_gather
        flat = torch.empty(1, combined.numel() * world_size, dtype=combined.dtype,
                           device=combined.device)
        dist.all_gather_single(flat, combined, group, async_op=False)
        stacked = flat.reshape(world_size, combined.numel())
    else:
        parts = [torch.empty_like(combined) for _ in range(world_size)]
        dist.all_gather(parts, combined, group, async_op=False)
        stacked = torch.stack(parts, dim=0)
    return torch.split(stacked, channels, dim=1)


class _SyncBatchNorm(Function):
    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, eps, momentum, group,
                world_size, quantizer):
        if not _channels_last(x):
            x = x.contiguous()
        if weight is not None:
            weight = weight.contiguous()
        kernels = _kernels(x.device)
        channels = x.shape[1]
        if x.numel() > 0:
            mean, invstd = kernels.batch_norm_stats(x, eps)
            count = torch.full((1,), x.numel() // channels, dtype=mean.dtype,
                               device=mean.device)
            combined = torch.cat([mean, invstd, count], dim=0)
        else:  # zero count: filtered out below, but the collective must run
            combined = torch.zeros(2 * channels + 1, dtype=x.dtype, device=x.device)
        mean_all, invstd_all, count_all = _gather_stats(combined, channels, group,
                                                        world_size)
        if not (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()):
            # As torch: drop empty ranks (a host sync, skipped under graph capture).
            nonempty = count_all.squeeze(-1) >= 1
            count_all, mean_all, invstd_all = (count_all[nonempty], mean_all[nonempty],
                                               invstd_all[nonempty])
        counts = count_all.view(-1)
        if running_mean is not None and counts.dtype != running_mean.dtype:
            counts = counts.to(running_mean.dtype)
        mean, invstd = kernels.batch_norm_gather_stats_with_counts(
            x, mean_all, invstd_all, running_mean, running_var, momentum, eps, counts)

        packed = quantizer.pack(x) if x.numel() > 0 else None
        ctx.save_for_backward(*(packed.tensors if packed is not None else (None,) * 3),
                              weight, mean, invstd, count_all.to(torch.int32))
        ctx.meta = (x.shape, x.dtype, _memory_format(x), group)
        if x.numel() > 0:
            return kernels.batch_norm_elemt(x, weight, bias, mean, invstd, eps)
        return torch.empty_like(x)

    @staticmethod
    def backward(ctx, gy):
        if not _channels_last(gy):
            gy = gy.contiguous()
        saved = ctx.saved_tensors
        weight, mean, invstd, count = saved[3:]
        shape, dtype, memory_format, group = ctx.meta
        need = ctx.needs_input_grad
        gx = gw = gb = None
        if saved[0] is not None:
            x_hat = ActivationQuantizer.unpack(Packed(*saved[:3]), shape, dtype)
            x_hat = x_hat.contiguous(memory_format=memory_format)
            kernels = _kernels(gy.device)
            sum_dy, sum_dy_xmu, gw, gb = kernels.batch_norm_backward_reduce(
                gy, x_hat, mean, invstd, weight, need[0], need[1], need[2])
            if need[0]:
                channels = sum_dy.shape[0]
                combined = torch.cat([sum_dy, sum_dy_xmu], dim=0)
                dist.all_reduce(combined, dist.ReduceOp.SUM, group, async_op=False)
                sum_dy, sum_dy_xmu = torch.split(combined, channels)
                if weight is not None and weight.dtype != mean.dtype:
                    weight = weight.to(mean.dtype)
                gx = kernels.batch_norm_backward_elemt(gy, x_hat, mean, invstd, weight,
                                                       sum_dy, sum_dy_xmu, count)
            # weight/bias gradients stay local: DDP all-reduces them, as for torch's.
            if weight is None or not need[1]:
                gw = None
            if weight is None or not need[2]:
                gb = None
        elif need[0]:
            # An empty local batch still joins the other ranks' all_reduce.
            combined = torch.zeros(2 * shape[1], dtype=dtype, device=gy.device)
            dist.all_reduce(combined, dist.ReduceOp.SUM, group, async_op=False)
        return gx, gw, gb, None, None, None, None, None, None, None


def sync_batch_norm(x: torch.Tensor, weight: Optional[torch.Tensor],
                    bias: Optional[torch.Tensor], running_mean: Optional[torch.Tensor],
                    running_var: Optional[torch.Tensor], eps: float, momentum: float,
                    group, world_size: int, quantizer: ActivationQuantizer) -> torch.Tensor:
    """Training-mode batch norm over the batches of all ranks of ``group``,
    saving ``x`` in 8 bits (arguments as torch's ``SyncBatchNorm`` Function)."""
    return _SyncBatchNorm.apply(x, weight, bias, running_mean, running_var, eps, momentum,
                                group, world_size, quantizer)


# ---------------------------------------------------------------------- module
class MesaSyncBatchNorm(MesaModule, nn.SyncBatchNorm):
    """:class:`torch.nn.SyncBatchNorm` storing its input in 8 bits (groups on
    channels), with torch's statistics, running-stat updates and collectives.

    Constructor arguments: see :class:`MesaModule` (``momentum`` is the
    batch-norm momentum; the running-range momentum is ``mesa_config``'s).
    Unlike torch's, it also syncs CPU inputs (see :class:`CpuKernels`).
    """
    _float_type = nn.SyncBatchNorm
    _group_dim = 1

    def _channels(self):
        return self.num_features

    def _sync_group(self):
        """``(group, world_size)`` to sync over; world size 1 when there is none."""
        if not (dist.is_available() and dist.is_initialized()):
            return None, 1
        group = self.process_group or dist.group.WORLD
        return group, dist.get_world_size(group)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not self._use_mesa(input):
            return super().forward(input)
        self._check_input_dim(input)
        self._check_non_zero_input_channels(input)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.track_running_stats:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average, as torch does
                factor = 1.0 / self.num_batches_tracked.item()
        running_mean = self.running_mean if self.track_running_stats else None
        running_var = self.running_var if self.track_running_stats else None
        group, world_size = self._sync_group()
        if world_size < 2:  # nothing to sync: batch norm of the local batch
            F._verify_batch_size(input.size())  # torch's error for one value per channel
            return ops.batch_norm(input, self.weight, self.bias, running_mean, running_var,
                                  factor, self.eps, self.quantizer)
        return sync_batch_norm(input, self.weight, self.bias, running_mean, running_var,
                               self.eps, factor, group, world_size, self.quantizer)
