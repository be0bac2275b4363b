"""Mesa autograd ops: exact forward, 8-bit saved activations, dequantized backward.

Every op follows one pattern:

* forward runs the same aten op torch runs (the output is exact), under the same
  dtype rules autocast would apply (we cast explicitly, then disable autocast);
* it saves only the quantized input (``Packed``: uint8 codes + per-group range)
  plus parameters and tiny per-row statistics (LayerNorm mean/rstd, BatchNorm
  batch mean/invstd and cuDNN's reserve) — ReLU saves a 1-bit mask;
* backward dequantizes and calls torch's own backward kernels.

The functional entry points take the layer's :class:`ActivationQuantizer`,
which owns the running range; the modules in :mod:`.modules` call them only in
training mode.
"""
from __future__ import annotations

import contextlib
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch.autograd import Function

from .primitives import pack_bits, unpack_bits
from .quantizer import ActivationQuantizer, Packed

__all__ = ['linear', 'conv2d', 'pad2d', 'layer_norm', 'gelu', 'softmax', 'matmul', 'batch_norm',
           'relu']


# ----------------------------------------------------------------- dtype rules
def _compute_dtype(x: torch.Tensor, autocast_to: str) -> torch.dtype:
    """The dtype torch's autocast would run this op in.

    ``'lower'``: matmul-like ops (linear, conv, matmul) run in the autocast dtype.
    ``'fp32'``: layer_norm and softmax are upcast to float32 by CUDA autocast
    (CPU autocast keeps their input dtype). ``'same'``: input dtype.
    """
    dev = x.device.type
    if autocast_to == 'same' or not torch.is_autocast_enabled(dev):
        return x.dtype
    if autocast_to == 'lower':
        return torch.get_autocast_dtype(dev)
    return x.dtype if dev == 'cpu' else torch.float32


def _cast(t: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    return t if t is None or t.dtype == dtype else t.to(dtype)


def _autocast_copy(t: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    """``t`` cast as autocast casts it in torch's own (grad-recording) forward,
    where the copy requires grad exactly when ``t`` does.

    A Function's forward runs without grad, so a plain cast would drop the flag,
    and kernel choices read it: ``matmul`` (``F.linear`` of a strided batch too)
    folds a batch @ matrix into one ``mm`` when the matrix requires grad, copying
    the batch if need be; otherwise a batch that does not fold as a view goes to
    a broadcast ``bmm`` (another accumulation order: other low-precision bits).
    """
    copy = _cast(t, dtype)
    if copy is not t and t.requires_grad:
        copy.requires_grad_(True)  # a leaf made under no_grad: nothing is recorded
    return copy


def _no_autocast(x: torch.Tensor):
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        return torch.autocast(dev, enabled=False)
    return contextlib.nullcontext()


_NOT_SAVED = (None, None, None)


def _pack_if(needed: bool, quantizer: ActivationQuantizer, x: torch.Tensor):
    """Quantize ``x`` only if backward will read it (e.g. a frozen weight needs no
    copy of the input: torch saves nothing there either)."""
    return quantizer.pack(x) if needed else None


def _save(ctx, packed: Optional[Packed], *others):
    ctx.save_for_backward(*(packed.tensors if packed is not None else _NOT_SAVED), *others)


def _load(ctx):
    saved = ctx.saved_tensors
    packed = Packed(*saved[:3]) if saved[0] is not None else None
    return packed, saved[3:]


# ---------------------------------------------------------------------- linear
def _linear_input_grad(gy: torch.Tensor, weight: torch.Tensor,
                       gy2: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``gy @ weight``: the gradient of ``F.linear``'s input, as one 2-D GEMM.

    ``gy.matmul(weight)`` on a non-contiguous 3-D gradient (mmcv's attention
    hands back ``(L, B, C)`` transposes) with a weight that does not require
    grad (under autocast: its bf16/fp16 copy) runs a batched matmul over the
    weight expanded per sample: 70x slower than one GEMM in bf16 on CPU.
    ``gy2``: ``gy`` already flattened to 2-D, where the caller has it.
    """
    gx = (gy.reshape(-1, gy.shape[-1]) if gy2 is None else gy2).mm(weight)
    return gx.view(*gy.shape[:-1], weight.shape[-1])


class _Linear(Function):
    @staticmethod
    def forward(ctx, x, weight, bias, quantizer: ActivationQuantizer):
        dt = _compute_dtype(x, 'lower')
        with _no_autocast(x):
            xc = _cast(x, dt)
            y = F.linear(xc, _autocast_copy(weight, dt), _autocast_copy(bias, dt))
        _save(ctx, _pack_if(ctx.needs_input_grad[1], quantizer, xc), weight)
        ctx.meta = (xc.shape, dt, x.dtype, bias is not None)
        return y

    @staticmethod
    def backward(ctx, gy):
        packed, (weight,) = _load(ctx)
        shape, dt, x_dtype, has_bias = ctx.meta
        gx = gw = gb = None
        gy2 = gy.reshape(-1, gy.shape[-1])
        if ctx.needs_input_grad[0]:
            gx = _linear_input_grad(gy, _cast(weight, dt), gy2).to(x_dtype)
        if ctx.needs_input_grad[1]:
            x_hat = ActivationQuantizer.unpack(packed, shape, dt)
            # One GEMM over all tokens: no per-sample weight gradients.
            gw = gy2.t().mm(x_hat.reshape(-1, shape[-1])).to(weight.dtype)
        if has_bias and ctx.needs_input_grad[2]:
            gb = gy2.sum(0).to(weight.dtype)
        return gx, gw, gb, None


def linear(x, weight, bias, quantizer):
    """``F.linear`` that saves its input in 8 bits (channel groups on the last dim)."""
    return _Linear.apply(x, weight, bias, quantizer)


# ---------------------------------------------------------------------- conv2d
#: Largest dequantized input slice a conv backward materialises at once. Wide
#: conv inputs (UPerHead's 2048-channel bottleneck: 256 MB at 512², batch 2)
#: are dequantized a channel block at a time, so backward holds one block (and
#: the backend's blocked-layout copies of it) instead of the whole input.
CONV_BACKWARD_CHUNK_BYTES = 32 * 2**20


class _Conv2d(Function):
    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups, quantizer):
        dt = _compute_dtype(x, 'lower')
        with _no_autocast(x):
            xc = _cast(x, dt)
            y = F.conv2d(xc, _cast(weight, dt), _cast(bias, dt), stride, padding, dilation, groups)
        _save(ctx, _pack_if(ctx.needs_input_grad[1], quantizer, xc), weight)
        ctx.meta = (xc.shape, dt, x.dtype, bias is not None, stride, padding, dilation, groups)
        return y

    @staticmethod
    def backward(ctx, gy):
        packed, (weight,) = _load(ctx)
        shape, dt, x_dtype, has_bias, stride, padding, dilation, groups = ctx.meta
        need = ctx.needs_input_grad
        w = _cast(weight, dt)
        conv_args = (stride, padding, dilation, False, [0, 0], groups)
        blocks = _channel_blocks(shape, dt, groups) if packed is not None else 1
        if blocks == 1:
            if packed is not None:
                x_hat = ActivationQuantizer.unpack(packed, shape, dt)
            else:  # only the input gradient is needed: it reads the input's shape alone
                x_hat = gy.new_zeros(()).expand(shape)
            gx, gw, gb = torch.ops.aten.convolution_backward(
                gy, x_hat, w, [weight.shape[0]] if has_bias else None, *conv_args,
                [need[0], need[1], has_bias and need[2]])
        else:
            gx = gy.new_empty(shape) if need[0] else None
            gw = torch.empty_like(w)
            step = -(-shape[1] // blocks)
            for c0 in range(0, shape[1], step):
                c1 = min(shape[1], c0 + step)
                _conv_backward_channels(gy, _unpack_channels(packed, shape, dt, c0, c1), w,
                                       conv_args, c0, gx, gw)
            gb = gy.sum((0, 2, 3)) if has_bias and need[2] else None
        return (None if gx is None else gx.to(x_dtype),
                None if gw is None else gw.to(weight.dtype),
                None if gb is None else gb.to(weight.dtype),
                None, None, None, None, None)


def _conv_backward_channels(gy: torch.Tensor, x_block: torch.Tensor, w: torch.Tensor,
                           conv_args: tuple, c0: int, gx: Optional[torch.Tensor],
                           gw: Optional[torch.Tensor]) -> None:
    """Input channels ``c0:c0 + x_block.shape[1]``'s part of an ungrouped conv's
    backward, written into ``gx`` / ``gw`` (None: not needed). Exact: input
    channel c's gradients read only ``x[:, c]`` and ``w[:, c]``."""
    c1 = c0 + x_block.shape[1]
    # A contiguous weight block: torch reads the slice's strides (input channels
    # innermost) as channels-last and would convert the input and output
    # gradients to that layout and back, block by block.
    gx_c, gw_c, _ = torch.ops.aten.convolution_backward(
        gy, x_block, w[:, c0:c1].contiguous(), None, *conv_args,
        [gx is not None, gw is not None, False])
    if gx is not None:
        gx[:, c0:c1] = gx_c
    if gw is not None:
        gw[:, c0:c1] = gw_c


def _channel_blocks(shape: torch.Size, dtype: torch.dtype, groups: int) -> int:
    """Channel blocks for a conv backward (1: dequantize the input whole)."""
    if groups != 1:  # a grouped conv's weight does not split along input channels alone
        return 1
    nbytes = shape.numel() * dtype.itemsize
    return max(1, min(shape[1], -(-nbytes // CONV_BACKWARD_CHUNK_BYTES)))


def _unpack_channels(packed: Packed, shape: torch.Size, dtype: torch.dtype,
                     c0: int, c1: int) -> torch.Tensor:
    """Dequantize input channels ``c0:c1`` of a ``(B, C, H, W)`` activation."""
    batch, channels = shape[:2]
    per_group = channels // packed.q.shape[1]
    # The same codes regrouped one channel per group: a Packed of the block,
    # a strided view (the kernel reads it in place; copying it first cost more
    # than dequantizing).
    block = Packed(packed.q.view(batch, channels, -1)[:, c0:c1],
                   packed.lo.repeat_interleave(per_group)[c0:c1],
                   packed.rng.repeat_interleave(per_group)[c0:c1])
    return ActivationQuantizer.unpack(block, (batch, c1 - c0, *shape[2:]), dtype)


def conv2d(x, weight, bias, stride, padding, dilation, groups, quantizer):
    """``F.conv2d`` (int padding) that saves its input in 8 bits (channel groups)."""
    return _Conv2d.apply(x, weight, bias, tuple(stride), tuple(padding), tuple(dilation),
                         groups, quantizer)


# ------------------------------------------------------------------------- pad
#: Paddings whose torch backward keeps the full-precision input (for its shape
#: alone); circular and constant padding save nothing.
_PAD_BACKWARD = {
    'reflect': torch.ops.aten.reflection_pad2d_backward,
    'replicate': torch.ops.aten.replication_pad2d_backward,
}


class _Pad2d(Function):
    @staticmethod
    def forward(ctx, x, pad, mode):
        ctx.meta = (x.shape, pad, mode)
        return F.pad(x, pad, mode=mode)

    @staticmethod
    def backward(ctx, gy):
        shape, pad, mode = ctx.meta
        # The backward kernel reads only the input's shape: a stride-0 stand-in.
        shape_only = gy.new_zeros(()).expand(shape)
        return _PAD_BACKWARD[mode](gy, shape_only, list(pad)), None, None


def pad2d(x, pad: Sequence[int], mode: str):
    """``F.pad(x, pad, mode)`` of a conv input (4 pad ints) that keeps no copy of
    ``x`` for backward, so a padded Mesa conv stores only its 8-bit input."""
    if mode not in _PAD_BACKWARD:
        return F.pad(x, pad, mode=mode)
    return _Pad2d.apply(x, tuple(pad), mode)


# ------------------------------------------------------------------ layer_norm
class _LayerNorm(Function):
    @staticmethod
    def forward(ctx, x, normalized_shape, weight, bias, eps, quantizer):
        dt = _compute_dtype(x, 'fp32')
        with _no_autocast(x):
            xc = _cast(x, dt)
            y, mean, rstd = torch.native_layer_norm(xc, normalized_shape, weight, bias, eps)
        _save(ctx, quantizer.pack(xc), mean, rstd, weight, bias)
        ctx.meta = (xc.shape, dt, x.dtype, tuple(normalized_shape))
        return y

    @staticmethod
    def backward(ctx, gy):
        packed, (mean, rstd, weight, bias) = _load(ctx)
        shape, dt, x_dtype, normalized_shape = ctx.meta
        need = ctx.needs_input_grad
        x_hat = ActivationQuantizer.unpack(packed, shape, dt)
        gx, gw, gb = torch.ops.aten.native_layer_norm_backward(
            gy.contiguous(), x_hat, normalized_shape, mean, rstd, weight, bias,
            [need[0], weight is not None and need[2], bias is not None and need[3]])
        return (None if gx is None else gx.to(x_dtype), None, gw, gb, None, None)


def layer_norm(x, normalized_shape: Sequence[int], weight, bias, eps: float, quantizer):
    """``F.layer_norm`` saving its input in 8 bits (+ fp32 mean/rstd per row)."""
    return _LayerNorm.apply(x, list(normalized_shape), weight, bias, eps, quantizer)


# ------------------------------------------------------------------------ gelu
class _GELU(Function):
    @staticmethod
    def forward(ctx, x, approximate, quantizer):
        y = F.gelu(x, approximate=approximate)
        _save(ctx, quantizer.pack(x))
        ctx.meta = (x.shape, x.dtype, approximate)
        return y

    @staticmethod
    def backward(ctx, gy):
        packed, _ = _load(ctx)
        shape, dtype, approximate = ctx.meta
        x_hat = ActivationQuantizer.unpack(packed, shape, dtype)
        return torch.ops.aten.gelu_backward(gy, x_hat, approximate=approximate), None, None


def gelu(x, approximate: str, quantizer):
    """``F.gelu``; the derivative is evaluated at the dequantized input."""
    return _GELU.apply(x, approximate, quantizer)


# --------------------------------------------------------------------- softmax
class _Softmax(Function):
    @staticmethod
    def forward(ctx, x, dim, quantizer):
        dt = _compute_dtype(x, 'fp32')
        with _no_autocast(x):
            y = torch.softmax(_cast(x, dt), dim)
        # Softmax's gradient needs only its output: y * (g - sum(g * y)).
        _save(ctx, quantizer.pack(y))
        ctx.meta = (y.shape, y.dtype, x.dtype, dim)
        return y

    @staticmethod
    def backward(ctx, gy):
        packed, _ = _load(ctx)
        shape, dtype, x_dtype, dim = ctx.meta
        y_hat = ActivationQuantizer.unpack(packed, shape, dtype)
        gx = torch._softmax_backward_data(gy.to(dtype), y_hat, dim, dtype)
        return gx.to(x_dtype), None, None


def softmax(x, dim: int, quantizer):
    """``torch.softmax`` saving its output in 8 bits (one group per head on dim 1)."""
    return _Softmax.apply(x, dim, quantizer)


# ---------------------------------------------------------------------- matmul
class _MatMul(Function):
    @staticmethod
    def forward(ctx, a, b, quantizer_a, quantizer_b):
        dt = _compute_dtype(a, 'lower')
        with _no_autocast(a):
            # Flags as in torch's forward: a batch @ matrix folds to one mm only
            # when the matrix requires grad.
            ac, bc = _autocast_copy(a, dt), _autocast_copy(b, dt)
            y = torch.matmul(ac, bc)
        # d(a@b)/da reads b and d(a@b)/db reads a.
        pa = _pack_if(ctx.needs_input_grad[1], quantizer_a, ac)
        pb = _pack_if(ctx.needs_input_grad[0], quantizer_b, bc)
        ctx.save_for_backward(*(pa.tensors if pa is not None else _NOT_SAVED),
                              *(pb.tensors if pb is not None else _NOT_SAVED))
        ctx.meta = (ac.shape, bc.shape, dt, a.dtype, b.dtype)
        return y

    @staticmethod
    def backward(ctx, gy):
        saved = ctx.saved_tensors
        a_shape, b_shape, dt, a_dtype, b_dtype = ctx.meta
        ga = gb = None
        gy = gy.to(dt)
        if ctx.needs_input_grad[0]:
            b_hat = ActivationQuantizer.unpack(Packed(*saved[3:]), b_shape, dt)
            ga = gy.matmul(b_hat.transpose(-1, -2)).sum_to_size(a_shape).to(a_dtype)
        if ctx.needs_input_grad[1]:
            a_hat = ActivationQuantizer.unpack(Packed(*saved[:3]), a_shape, dt)
            gb = a_hat.transpose(-1, -2).matmul(gy).sum_to_size(b_shape).to(b_dtype)
        return ga, gb, None, None


def matmul(a, b, quantizer_a, quantizer_b):
    """``a @ b`` (both >= 2-D) saving both operands in 8 bits (per head on dim 1)."""
    return _MatMul.apply(a, b, quantizer_a, quantizer_b)


# ------------------------------------------------------------------ batch_norm
class _BatchNorm(Function):
    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, momentum, eps, quantizer):
        with _no_autocast(x):
            # F.batch_norm's own dispatch (cuDNN, MIOpen or native, as torch picks
            # for this input): the same kernel, so the same bits and the same
            # running-statistics update.
            y, save_mean, save_var, reserve, impl_index = \
                torch.ops.aten._batch_norm_impl_index(
                    x, weight, bias, running_mean, running_var, True, momentum, eps,
                    torch.backends.cudnn.enabled)
        _save(ctx, quantizer.pack(x), weight, save_mean, save_var, reserve)
        # The output has the layout the kernel ran in (contiguous or channels-last).
        ctx.meta = (x.shape, x.dtype, y.stride(), eps, impl_index)
        return y

    @staticmethod
    def backward(ctx, gy):
        packed, (weight, save_mean, save_var, reserve) = _load(ctx)
        shape, dtype, layout, eps, impl_index = ctx.meta
        need = ctx.needs_input_grad
        # Backward in the forward's layout: cuDNN picks its mode (and so what the
        # reserve holds) from the input's layout.
        x_hat = _restride(ActivationQuantizer.unpack(packed, shape, dtype), layout)
        affine = weight is not None
        grads = torch.ops.aten._batch_norm_impl_index_backward(
            impl_index, x_hat, _restride(gy, layout), weight, None, None, save_mean, save_var,
            True, eps, [need[0], affine and need[1], affine and need[2]], reserve)
        # cuDNN computes all three whatever the mask: hand back only those asked for.
        gx, gw, gb = (g if n else None for g, n in zip(grads, need[:3]))
        return gx, gw, gb, None, None, None, None, None


def _restride(t: torch.Tensor, stride: Sequence[int]) -> torch.Tensor:
    """``t`` laid out with ``stride`` (copied only if it is not already)."""
    if t.stride() == tuple(stride):
        return t
    return torch.empty_strided(t.shape, stride, dtype=t.dtype, device=t.device).copy_(t)


def batch_norm(x, weight, bias, running_mean, running_var, momentum: float, eps: float,
               quantizer):
    """Training-mode ``F.batch_norm`` saving its input in 8 bits (channel groups)."""
    return _BatchNorm.apply(x, weight, bias, running_mean, running_var, momentum, eps,
                            quantizer)


# ------------------------------------------------------------------------ relu
class _ReLU(Function):
    @staticmethod
    def forward(ctx, x, inplace):
        if inplace:
            ctx.mark_dirty(x)
            y = torch.relu_(x)
        else:
            y = torch.relu(x)
        # The gradient needs only sign(y): one bit per element.
        ctx.save_for_backward(pack_bits(y > 0))
        ctx.shape = y.shape
        return y

    @staticmethod
    def backward(ctx, gy):
        (packed,) = ctx.saved_tensors
        mask = unpack_bits(packed, ctx.shape)
        return gy * mask, None


def relu(x, inplace: bool = False):
    """``F.relu`` saving a 1-bit mask for backward."""
    return _ReLU.apply(x, inplace)
