"""Store-once Mesa ops: two consecutive layers that would each keep an 8-bit
copy of the same tensor (or of one computed cheaply from the other) keep one.

=========================  ===============================================
:func:`softmax_matmul`     ``softmax(scores) @ v``: the probabilities are
                           stored once (softmax's backward and the
                           gradient of ``v`` both read them).
:func:`gelu_linear`,       ``linear(gelu(h))`` / ``conv2d(gelu(h))``: only
:func:`gelu_conv2d`        GELU's input is stored; backward recomputes
                           ``gelu(h_hat)`` for the weight gradient.
:func:`in_projection`      several linears over the same input (PVT's
                           ``q``/``kv`` at ``sr_ratio=1``, the in-projections
                           of :mod:`.attention`): one copy of the input.
:func:`resize_cat_conv2d`  ``conv2d(cat([maps[0], *upsampled others]))``
                           (UPerHead's bottleneck): every map stored at its
                           own resolution, upsampled again in backward.
=========================  ===============================================

Each follows the pattern of :mod:`.ops`: the forward runs torch's own kernels
under autocast's dtype rules (bit-identical to the unfused modules), and
backward dequantizes and calls torch's backward kernels. The copy is made by
the quantizer that made it before (softmax's output quantizer, GELU's input
quantizer, the first linear's), so running ranges and checkpoints carry over;
the quantizers of the second copies stay in the modules (their state_dict keys
load from any checkpoint) and are simply not updated.

The module-level helpers (:func:`probs_matmul`, :func:`gelu_project`,
:func:`shared_input_linears`, :func:`resized_cat_conv`) take the modules of a block and run a store-once
op when it is valid: training with Mesa on in every module involved and no
active dropout between them. Otherwise they call the modules in sequence, as
the block always did. On the store-once path the modules are applied
functionally, so forward hooks registered on them do not run.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd import Function

from .modules import MesaConv2d, MesaGELU, MesaLinear, MesaMatMul, MesaModule, MesaSoftmax
from .ops import (_NOT_SAVED, _autocast_copy, _cast, _channel_blocks, _compute_dtype,
                  _conv_backward_channels, _linear_input_grad, _load, _no_autocast,
                  _pack_if, _save, _unpack_channels)
from .quantizer import ActivationQuantizer, Packed

__all__ = [
    'softmax_matmul', 'gelu_linear', 'gelu_conv2d', 'in_projection', 'probs_matmul',
    'gelu_project', 'shared_input_linears', 'resize_cat_conv2d', 'resized_cat_conv',
    'use_store_once', 'store_once_enabled', 'running_quantizer',
]

_local = threading.local()


# ------------------------------------------------------------------- switches
def store_once_enabled() -> bool:
    """Whether the module-level helpers may take their store-once path."""
    return getattr(_local, 'enabled', True)


@contextlib.contextmanager
def use_store_once(enabled: bool) -> Iterator[None]:
    """Turn the store-once path of the helpers on/off in this thread for a
    block of code (``False``: every layer stores its own copy, as before; for
    comparisons and measurements)."""
    before = store_once_enabled()
    _local.enabled = bool(enabled)
    try:
        yield
    finally:
        _local.enabled = before


def running_quantizer() -> Optional[ActivationQuantizer]:
    """The quantizer owning the store-once op now being applied in this thread
    (None outside one). Its saves happen outside any Mesa module's forward, so
    the coverage audit asks this to attribute them."""
    stack = getattr(_local, 'owners', None)
    return stack[-1] if stack else None


@contextlib.contextmanager
def _owned_by(quantizer: ActivationQuantizer) -> Iterator[None]:
    stack = _local.__dict__.setdefault('owners', [])
    stack.append(quantizer)
    try:
        yield
    finally:
        stack.pop()


def _tensors(packed: Optional[Packed]) -> tuple:
    return packed.tensors if packed is not None else _NOT_SAVED


def _unpacked(saved: Sequence[torch.Tensor], shape, dtype) -> Optional[torch.Tensor]:
    if saved[0] is None:
        return None
    return ActivationQuantizer.unpack(Packed(*saved), shape, dtype)


# ------------------------------------------------------------ softmax @ v
class _SoftmaxMatMul(Function):
    @staticmethod
    def forward(ctx, scores, v, dim, quant_p, quant_v):
        # ops.softmax then ops.matmul, each under its own autocast rule.
        s_dtype = _compute_dtype(scores, 'fp32')
        with _no_autocast(scores):
            probs = torch.softmax(_cast(scores, s_dtype), dim)
        m_dtype = _compute_dtype(probs, 'lower')
        # Flags as in torch's forward (ops.matmul): matmul's kernel choice reads them.
        probs.requires_grad_(scores.requires_grad)
        with _no_autocast(probs):
            vc = _autocast_copy(v, m_dtype)
            out = torch.matmul(_autocast_copy(probs, m_dtype), vc)
        need_scores, need_v = ctx.needs_input_grad[:2]
        # The softmax backward and the gradient of v read the probabilities;
        # the gradient of the probabilities reads v.
        packed_p = _pack_if(need_scores or need_v, quant_p, probs)
        packed_v = _pack_if(need_scores, quant_v, vc)
        ctx.save_for_backward(*_tensors(packed_p), *_tensors(packed_v))
        ctx.meta = (probs.shape, s_dtype, scores.dtype, vc.shape, m_dtype, v.dtype, dim)
        return out

    @staticmethod
    def backward(ctx, g_out):
        p_shape, s_dtype, scores_dtype, v_shape, m_dtype, v_dtype, dim = ctx.meta
        saved = ctx.saved_tensors
        need_scores, need_v = ctx.needs_input_grad[:2]
        g_out = g_out.to(m_dtype)
        probs = _unpacked(saved[:3], p_shape, s_dtype)
        g_scores = g_v = None
        if need_v:
            g_v = (_cast(probs, m_dtype).transpose(-1, -2).matmul(g_out)
                   .sum_to_size(v_shape).to(v_dtype))
        if need_scores:
            v_hat = _unpacked(saved[3:], v_shape, m_dtype)
            g_probs = g_out.matmul(v_hat.transpose(-1, -2)).sum_to_size(p_shape).to(s_dtype)
            del v_hat
            g_scores = torch._softmax_backward_data(g_probs, probs, dim, s_dtype)
            g_scores = g_scores.to(scores_dtype)
        return g_scores, g_v, None, None, None


def softmax_matmul(scores: torch.Tensor, v: torch.Tensor, dim: int,
                   quant_p: ActivationQuantizer, quant_v: ActivationQuantizer) -> torch.Tensor:
    """``torch.matmul(torch.softmax(scores, dim), v)`` (exact, as the two Mesa
    ops compute it) storing the probabilities once, by ``quant_p``, and ``v``
    by ``quant_v``, in 8 bits."""
    with _owned_by(quant_p):
        return _SoftmaxMatMul.apply(scores, v, dim, quant_p, quant_v)


# ---------------------------------------------------------- gelu -> linear
class _GELULinear(Function):
    @staticmethod
    def forward(ctx, h, weight, bias, approximate, quant_h):
        a = F.gelu(h, approximate=approximate)  # autocast applies, as in ops.gelu
        dtype = _compute_dtype(a, 'lower')
        with _no_autocast(a):
            # As ops.linear: the weight's cast keeps requires_grad (kernel choice).
            y = F.linear(_cast(a, dtype), _autocast_copy(weight, dtype),
                         _autocast_copy(bias, dtype))
        need_h, need_w = ctx.needs_input_grad[:2]
        _save(ctx, _pack_if(need_h or need_w, quant_h, h), weight)
        ctx.meta = (h.shape, h.dtype, a.dtype, dtype, approximate, bias is not None)
        return y

    @staticmethod
    def backward(ctx, gy):
        packed, (weight,) = _load(ctx)
        h_shape, h_dtype, a_dtype, dtype, approximate, has_bias = ctx.meta
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        gy = gy.to(dtype)
        gy2 = gy.reshape(-1, gy.shape[-1])
        h_hat = ActivationQuantizer.unpack(packed, h_shape, h_dtype) if packed is not None else None
        gh = gw = gb = None
        if need_w:
            # fc2's input, recomputed from GELU's stored input.
            a_hat = _cast(F.gelu(h_hat, approximate=approximate), dtype)
            gw = gy2.t().mm(a_hat.reshape(-1, a_hat.shape[-1])).to(weight.dtype)
            del a_hat
        if has_bias and need_b:
            gb = gy2.sum(0).to(weight.dtype)
        if need_h:
            ga = _linear_input_grad(gy, _cast(weight, dtype), gy2).to(a_dtype)
            gh = torch.ops.aten.gelu_backward(ga, h_hat, approximate=approximate)
        return gh, gw, gb, None, None


def gelu_linear(h: torch.Tensor, approximate: str, weight: torch.Tensor,
                bias: Optional[torch.Tensor], quant_h: ActivationQuantizer) -> torch.Tensor:
    """``F.linear(F.gelu(h), weight, bias)`` (exact) storing only ``h``, in 8
    bits by ``quant_h`` (GELU's input quantizer)."""
    with _owned_by(quant_h):
        return _GELULinear.apply(h, weight, bias, approximate, quant_h)


# ---------------------------------------------------------- gelu -> conv2d
class _GELUConv2d(Function):
    @staticmethod
    def forward(ctx, h, weight, bias, stride, padding, dilation, groups, approximate, quant_h):
        a = F.gelu(h, approximate=approximate)
        dtype = _compute_dtype(a, 'lower')
        with _no_autocast(a):
            y = F.conv2d(_cast(a, dtype), _cast(weight, dtype), _cast(bias, dtype), stride,
                         padding, dilation, groups)
        need_h, need_w = ctx.needs_input_grad[:2]
        _save(ctx, _pack_if(need_h or need_w, quant_h, h), weight)
        ctx.meta = (h.shape, h.dtype, a.dtype, dtype, approximate, bias is not None,
                    (stride, padding, dilation, False, [0, 0], groups))
        return y

    @staticmethod
    def backward(ctx, gy):
        packed, (weight,) = _load(ctx)
        h_shape, h_dtype, a_dtype, dtype, approximate, has_bias, conv_args = ctx.meta
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        h_hat = ActivationQuantizer.unpack(packed, h_shape, h_dtype) if packed is not None else None
        if need_w:  # fc2's input, recomputed from GELU's stored input
            a_hat = _cast(F.gelu(h_hat, approximate=approximate), dtype)
        else:  # the input and bias gradients read the input's shape alone
            a_hat = gy.new_zeros((), dtype=dtype).expand(h_shape)
        ga, gw, gb = torch.ops.aten.convolution_backward(
            gy.to(dtype), a_hat, _cast(weight, dtype), [weight.shape[0]] if has_bias else None,
            *conv_args, [need_h, need_w, has_bias and need_b])
        del a_hat
        gh = None
        if need_h:
            gh = torch.ops.aten.gelu_backward(ga.to(a_dtype), h_hat, approximate=approximate)
        return (gh, None if gw is None else gw.to(weight.dtype),
                None if gb is None else gb.to(weight.dtype), None, None, None, None, None, None)


def gelu_conv2d(h: torch.Tensor, approximate: str, weight: torch.Tensor,
                bias: Optional[torch.Tensor], stride, padding, dilation, groups: int,
                quant_h: ActivationQuantizer) -> torch.Tensor:
    """``F.conv2d(F.gelu(h), ...)`` (int padding; exact) storing only ``h``,
    in 8 bits by ``quant_h``."""
    with _owned_by(quant_h):
        return _GELUConv2d.apply(h, weight, bias, tuple(stride), tuple(padding),
                                 tuple(dilation), groups, approximate, quant_h)


# ------------------------------------------------- linears over one input
def _same_data(a: torch.Tensor, b: torch.Tensor) -> bool:
    """``a`` and ``b`` are the same tensor, or views of one base tensor with the
    same geometry (mmcv passes q, k and v as three transposes of one input),
    both recorded by autograd or neither: a gradient routed through either view
    then reaches the base identically."""
    if a is b:
        return True
    return (a._base is not None and a._base is b._base and a.shape == b.shape
            and a.stride() == b.stride() and a.storage_offset() == b.storage_offset()
            and a.dtype == b.dtype and a.requires_grad == b.requires_grad)


class _Linears(Function):
    """``F.linear(inputs[src[i]], weights[i], biases[i])`` for several linears
    over a few inputs; each input is saved once, in 8 bits."""

    @staticmethod
    def forward(ctx, src, quantizers, *tensors):
        n_in, n_out = len(quantizers), len(src)
        xs, ws, bs = tensors[:n_in], tensors[n_in:n_in + n_out], tensors[n_in + n_out:]
        # As ops.linear: cast as autocast would, the weight's copy keeping
        # requires_grad (with autocast left on, its copy made here without grad
        # sent mmcv's (L, B, C) inputs to a bmm over the weight expanded per
        # sample, 35x slower in bf16 on CPU, other bits than torch's forward).
        ys = []
        for s, w, b in zip(src, ws, bs):
            dtype = _compute_dtype(xs[s], 'lower')
            with _no_autocast(xs[s]):
                ys.append(F.linear(_cast(xs[s], dtype), _autocast_copy(w, dtype),
                                   _autocast_copy(b, dtype)))
        need_w = ctx.needs_input_grad[2 + n_in:2 + n_in + n_out]
        saved, meta = [], []
        for i, (x, quantizer) in enumerate(zip(xs, quantizers)):
            users = [j for j, s in enumerate(src) if s == i]
            if any(need_w[j] for j in users):
                saved += quantizer.pack(x).tensors
                meta.append((x.shape, x.dtype, True))
            else:
                meta.append((x.shape, x.dtype, False))
        ctx.save_for_backward(*saved, *ws)
        ctx.meta = (src, meta, [y.dtype for y in ys], [b is not None for b in bs])
        return tuple(ys)

    @staticmethod
    def backward(ctx, *grads):
        src, meta, y_dtypes, has_bias = ctx.meta
        n_in, n_out = len(meta), len(src)
        need = ctx.needs_input_grad[2:]
        saved = list(ctx.saved_tensors)
        ws = saved[len(saved) - n_out:]
        packs, pos = [], 0
        for _, _, stored in meta:
            packs.append(saved[pos:pos + 3] if stored else None)
            pos += 3 if stored else 0
        gxs: List[Optional[torch.Tensor]] = [None] * n_in
        gws: List[Optional[torch.Tensor]] = [None] * n_out
        gbs: List[Optional[torch.Tensor]] = [None] * n_out
        x_hats: dict = {}
        for j, (s, gy) in enumerate(zip(src, grads)):
            if gy is None:
                continue
            dt = y_dtypes[j]
            gy = gy.to(dt)
            w = ws[j].to(dt)
            if need[s]:
                gx = _linear_input_grad(gy, w)
                gxs[s] = gx if gxs[s] is None else gxs[s] + gx
            if need[n_in + j]:
                if (s, dt) not in x_hats:
                    shape = meta[s][0]
                    x_hats[s, dt] = _unpacked(packs[s], shape, dt).reshape(-1, shape[-1])
                gws[j] = gy.reshape(-1, gy.shape[-1]).t().mm(x_hats[s, dt]).to(ws[j].dtype)
            if has_bias[j] and need[n_in + n_out + j]:
                gbs[j] = gy.reshape(-1, gy.shape[-1]).sum(0).to(ws[j].dtype)
        gxs = [None if g is None else g.to(meta[i][1]) for i, g in enumerate(gxs)]
        return (None, None, *gxs, *gws, *gbs)


def in_projection(inputs: Sequence[torch.Tensor], weights: Sequence[torch.Tensor],
                  biases: Sequence[Optional[torch.Tensor]],
                  quantizers: Sequence[ActivationQuantizer]) -> Tuple[torch.Tensor, ...]:
    """``F.linear(inputs[i], weights[i], biases[i])`` for each ``i`` (exact),
    saving each distinct input once in 8 bits.

    Inputs that are the same tensor, or same-geometry views of one base
    tensor, share one 8-bit copy, quantized by the quantizer of the first.
    """
    uniq: List[torch.Tensor] = []
    quants: List[ActivationQuantizer] = []
    src: List[int] = []
    for x, quantizer in zip(inputs, quantizers):
        for i, u in enumerate(uniq):
            if _same_data(x, u):
                src.append(i)
                break
        else:
            src.append(len(uniq))
            uniq.append(x)
            quants.append(quantizer)
    with _owned_by(quants[0]):
        return _Linears.apply(tuple(src), tuple(quants), *uniq, *weights, *biases)


# --------------------------------------- conv2d over resized, concatenated maps
def _resize_all(pieces: Sequence[torch.Tensor], size: Tuple[int, int],
                align_corners: bool) -> List[torch.Tensor]:
    """The first map as it is, the others resized to ``size`` (bilinear), as
    UPerHead feeds its bottleneck."""
    return [pieces[0]] + [F.interpolate(p, size=size, mode='bilinear',
                                        align_corners=align_corners) for p in pieces[1:]]


class _ConvOfResizedCat(Function):
    """``conv2d(x)`` for ``x = cat([maps[0], *resized others])``; backward reads
    the maps' 8-bit codes (the others' made by the caller before ``x`` existed,
    the first one's made here from ``x``'s own channels after the convolution,
    so that no full-resolution map outlives the concatenation)."""

    @staticmethod
    def forward(ctx, x, weight, bias, conv_args, quantizer, first_range, shapes, size,
                align_corners, *codes):
        dtype = _compute_dtype(x, 'lower')
        stride, padding, dilation, groups = conv_args
        with _no_autocast(x):
            xc = _cast(x, dtype)
            y = F.conv2d(xc, _cast(weight, dtype), _cast(bias, dtype), stride, padding,
                         dilation, groups)
        saved = ()
        if ctx.needs_input_grad[1]:
            first = quantizer.pack_with(xc[:, :shapes[0][1]], *first_range)
            saved = first.tensors + codes
        ctx.save_for_backward(weight, *saved)
        ctx.meta = (x.shape, x.dtype, dtype, shapes, size, align_corners, bias is not None,
                    (stride, padding, dilation, False, [0, 0], groups), len(codes))
        return y

    @staticmethod
    def backward(ctx, gy):
        weight, *flat = ctx.saved_tensors
        (x_shape, x_dtype, dtype, shapes, size, align_corners, has_bias, conv_args,
         n_codes) = ctx.meta
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        gy, w = gy.to(dtype), _cast(weight, dtype)
        gx = gy.new_empty(x_shape) if need_x else None
        gw = torch.empty_like(w) if need_w else None
        c0 = 0
        for k, shape in enumerate(shapes):
            full = torch.Size((shape[0], shape[1], *size))
            # Channel blocks: their gradients read only their own input channels
            # and weight columns (exact per block); a block bounds the
            # dequantized copy.
            blocks = _channel_blocks(full, dtype, conv_args[-1]) if need_w else 1
            step = -(-shape[1] // blocks)
            for s0 in range(0, shape[1], step):
                s1 = min(shape[1], s0 + step)
                if need_w:
                    x_hat = _unpack_channels(Packed(*flat[3 * k:3 * k + 3]), shape, dtype, s0, s1)
                    if k:  # the map as the concatenation held it
                        x_hat = F.interpolate(x_hat, size=size, mode='bilinear',
                                              align_corners=align_corners)
                else:  # the input gradient reads the input's shape alone
                    x_hat = gy.new_zeros(()).expand(full[0], s1 - s0, *size)
                _conv_backward_channels(gy, x_hat, w, conv_args, c0 + s0, gx, gw)
                del x_hat
            c0 += shape[1]
        gb = gy.sum((0, 2, 3)).to(weight.dtype) if has_bias and need_b else None
        return (None if gx is None else gx.to(x_dtype),
                None if gw is None else gw.to(weight.dtype), gb,
                *(None,) * (6 + n_codes))


def resize_cat_conv2d(maps: List[torch.Tensor], align_corners: bool, weight: torch.Tensor,
                      bias: Optional[torch.Tensor], stride, padding, dilation, groups: int,
                      quantizer: ActivationQuantizer) -> torch.Tensor:
    """``F.conv2d(torch.cat([maps[0], *others resized to maps[0]'s size], 1), ...)``
    (bilinear; int padding, ungrouped; exact) storing every map at its own
    resolution, in 8 bits by ``quantizer`` (one running range over the
    concatenation's channel groups, which every map must hold whole).

    ``maps`` is emptied: its maps are released once concatenated, as mmseg's
    UPerHead releases them, so that only the concatenation is held while the
    convolution runs.
    """
    size = tuple(maps[0].shape[2:])
    shapes = [m.shape for m in maps]
    with _owned_by(quantizer):
        first_range, codes = None, ()
        if weight.requires_grad:
            dtype = _compute_dtype(maps[0], 'lower')
            with torch.no_grad():
                ranges = quantizer.block_ranges([_cast(m.detach(), dtype) for m in maps])
                codes = tuple(t for m, r in zip(maps[1:], ranges[1:])
                              for t in quantizer.pack_with(_cast(m.detach(), dtype), *r).tensors)
            first_range = ranges[0]
        x = torch.cat(_resize_all(maps, size, align_corners), 1)
        maps.clear()
        return _ConvOfResizedCat.apply(
            x, weight, bias, (tuple(stride), tuple(padding), tuple(dilation), groups),
            quantizer, first_range, shapes, size, align_corners, *codes)


# ------------------------------------------------------ module-level helpers
def _dropout_inactive(dropout: Optional[nn.Module]) -> bool:
    """``dropout`` is the identity now (``nn.Dropout(0.)`` returns its input)."""
    if dropout is None or type(dropout) is nn.Identity:
        return True
    return type(dropout) is nn.Dropout and (dropout.p == 0 or not dropout.training)


def _runs_as(module: nn.Module, cls: type) -> bool:
    """``module`` is a ``cls`` whose forward is ``cls``'s (a subclass may only
    change the layout of its quantizers, as MiT's channels-first GELU does)."""
    return isinstance(module, cls) and type(module).forward is cls.forward


def _mesa_on(module: nn.Module, *inputs: torch.Tensor) -> bool:
    return isinstance(module, MesaModule) and module._use_mesa(*inputs)


def probs_matmul(scores: torch.Tensor, v: torch.Tensor, softmax: nn.Module,
                 dropout: Optional[nn.Module], matmul: nn.Module) -> torch.Tensor:
    """``matmul(dropout(softmax(scores)), v)``; the probabilities are stored
    once (by ``softmax``'s quantizer) when both ``softmax`` and ``matmul`` run
    Mesa and ``dropout`` (None: no dropout) is inactive."""
    if (store_once_enabled() and _runs_as(softmax, MesaSoftmax)
            and _runs_as(matmul, MesaMatMul) and _dropout_inactive(dropout)
            and scores.dim() >= 2 and v.dim() >= 2
            and _mesa_on(softmax, scores) and _mesa_on(matmul, scores, v)):
        dim = (softmax.dim if softmax.dim is not None
               else F._get_softmax_dim('softmax', scores.dim(), 3))
        return softmax_matmul(scores, v, dim, softmax.quantizer, matmul.quantizer_b)
    probs = softmax(scores)
    return matmul(dropout(probs) if dropout is not None else probs, v)


def gelu_project(h: torch.Tensor, act: nn.Module, dropout: Optional[nn.Module],
                 proj: nn.Module) -> torch.Tensor:
    """``proj(dropout(act(h)))``; only GELU's input is stored when ``act`` is
    a Mesa GELU, ``proj`` a Mesa Linear (or a zero-padded Mesa Conv2d with int
    padding, with ``act`` grouping the channels, dim 1), both run Mesa, and
    ``dropout`` is inactive."""
    if (store_once_enabled() and _runs_as(act, MesaGELU) and _dropout_inactive(dropout)
            and _mesa_on(act, h) and _mesa_on(proj, h)):
        if _runs_as(proj, MesaLinear):
            return gelu_linear(h, act.approximate, proj.weight, proj.bias, act.quantizer)
        if (_runs_as(proj, MesaConv2d) and proj.padding_mode == 'zeros'
                and not isinstance(proj.padding, str) and act.quantizer.dim == 1):
            return gelu_conv2d(h, act.approximate, proj.weight, proj.bias, proj.stride,
                               proj.padding, proj.dilation, proj.groups, act.quantizer)
    a = act(h)
    return proj(dropout(a) if dropout is not None else a)


def shared_input_linears(x: torch.Tensor,
                         linears: Sequence[nn.Module]) -> Tuple[torch.Tensor, ...]:
    """``tuple(linear(x) for linear in linears)``; ``x`` is stored once (by the
    first linear's quantizer) when every linear is a Mesa Linear running Mesa."""
    if (store_once_enabled() and len(linears) > 1
            and all(_runs_as(m, MesaLinear) and m._use_mesa(x) for m in linears)):
        return in_projection([x] * len(linears), [m.weight for m in linears],
                             [m.bias for m in linears], [m.quantizer for m in linears])
    return tuple(m(x) for m in linears)


def resized_cat_conv(maps: List[torch.Tensor], align_corners: bool,
                     conv: nn.Module) -> torch.Tensor:
    """``conv(torch.cat([maps[0], *others resized to maps[0]'s size], 1))``
    (bilinear, UPerHead's bottleneck input); the maps are stored at their own
    resolution instead of the concatenation at the full one when ``conv`` is a
    zero-padded, ungrouped Mesa Conv2d running Mesa with quantization groups
    along channels (dim 1) that each map holds whole. ``maps`` is emptied
    either way (see :func:`resize_cat_conv2d`)."""
    if (store_once_enabled() and _runs_as(conv, MesaConv2d) and conv.padding_mode == 'zeros'
            and not isinstance(conv.padding, str) and conv.groups == 1
            and conv.quantizer.dim == 1
            and _mesa_on(conv, maps[0]) and _whole_groups(maps, conv.quantizer.groups)):
        return resize_cat_conv2d(maps, align_corners, conv.weight, conv.bias, conv.stride,
                                 conv.padding, conv.dilation, conv.groups, conv.quantizer)
    x = torch.cat(_resize_all(maps, tuple(maps[0].shape[2:]), align_corners), 1)
    maps.clear()
    return conv(x)


def _whole_groups(pieces: Sequence[torch.Tensor], groups: int) -> bool:
    channels = sum(p.shape[1] for p in pieces)
    return channels % groups == 0 and all(p.shape[1] % (channels // groups) == 0
                                          for p in pieces)
