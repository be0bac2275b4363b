"""Mesa multi-head attention: ``torch.nn.MultiheadAttention`` with 8-bit storage.

:class:`MesaMultiheadAttention` is a drop-in subclass of
:class:`torch.nn.MultiheadAttention` (same constructor, parameters and
``state_dict`` keys, plus its quantizers' buffers). In training with Mesa on it
runs the op sequence of ``F.multi_head_attention_forward`` itself, so its
output is bit-identical to torch's, but what backward needs is kept in 8 bits,
one quantization group per head for the attention tensors:

==========================  ==================================================
``need_weights=True``       torch's explicit path (``bmm``/``baddbmm``,
                            softmax, dropout, ``bmm``): q, k, v and the
                            probabilities in 8 bits, the dropout mask in 1 bit.
``need_weights=False``      torch calls ``scaled_dot_product_attention``. Where
                            it picks a fused kernel (CPU flash; CUDA flash or
                            memory-efficient) the same kernel runs and q, k, v
                            and the output are kept in 8 bits plus the per-row
                            log-sum-exp: no ``N x M`` tensor is stored, and
                            backward is torch's fused backward on the
                            dequantized copies. Where it picks the math
                            backend (dropout on CPU, an attention mask that
                            needs a gradient) the explicit path runs, with
                            torch's math op sequence.
in-projection               each distinct input saved once: a self-attention
                            input shared by q, k and v (also as three views of
                            one tensor, as mmcv passes it) and a key = value
                            input (SegFormer's ``x_kv``) are quantized once.
out-projection              its input in 8 bits (on the fused path the same
                            copy serves the attention backward).
==========================  ==================================================

Eval, ``no_grad`` and ``mesa_enabled = False`` run torch's own forward
(including its inference fast path). Cases that gain nothing or are not
replicated (nested tensors, ``dropout >= 1``, a causal hint on the math
backend, CUDA kernels other than the two above, a CUDA flash head size
torch would pad, a mask on the CUDA memory-efficient kernel) keep torch's
attention core in full precision; the projections are still compressed. The
CUDA kernel calls follow the ops' schemas in torch 2.14 and are checked by
``tests/test_attention.py::test_cuda`` on a GPU machine.
"""
from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd import Function

from .config import QuantizerConfig
from .modules import MesaModule
from .primitives import pack_bits, unpack_bits
from .quantizer import ActivationQuantizer, Packed
from .shared_ops import in_projection

__all__ = ['MesaMultiheadAttention', 'in_projection', 'attention', 'fused_attention']

# Values of torch.nn.attention.SDPBackend (torch._fused_sdp_choice returns them).
_SDP_MATH, _SDP_FLASH, _SDP_EFFICIENT = 0, 1, 2


# ----------------------------------------------------------------------- helpers
class _HeadLayout(NamedTuple):
    """How a per-head tensor was laid out when packed (see :func:`_pack_heads`)."""
    shape: torch.Size            # its logical shape
    perm: Tuple[int, ...]        # dims in memory order (outermost first)


def _pack_heads(quantizer: ActivationQuantizer, t: torch.Tensor,
                heads: int) -> Tuple[Packed, _HeadLayout]:
    """Quantize an attention tensor with one group per head, in its memory order.

    ``t`` is ``(B, heads, N, D)`` or torch's explicit ``(B * heads, N, D)``.
    q, k and v are views of the in-projection output, stored ``(N, B, heads,
    D)``: grouping them in that order needs no copy (``quantizer`` has dim 1
    and sees ``(outer, heads, inner)``)."""
    t4 = t.unflatten(0, (-1, heads)) if t.dim() == 3 else t
    perm = tuple(sorted(range(4), key=lambda d: -t4.stride(d)))
    mem = t4.permute(perm)
    head = perm.index(1)
    outer = math.prod(mem.shape[:head])
    return quantizer.pack(mem.reshape(outer, heads, -1)), _HeadLayout(t.shape, perm)


def _unpack_heads(saved: Sequence[torch.Tensor], layout: _HeadLayout, heads: int,
                  dtype: torch.dtype) -> torch.Tensor:
    """Inverse of :func:`_pack_heads`: a tensor of the packed tensor's shape
    (and memory order), in ``dtype``."""
    shape4 = ((layout.shape[0] // heads, heads, *layout.shape[1:])
              if len(layout.shape) == 3 else tuple(layout.shape))
    mem_shape = [shape4[d] for d in layout.perm]
    flat = ActivationQuantizer.unpack(Packed(*saved), (math.prod(mem_shape), ), dtype)
    inverse = [layout.perm.index(d) for d in range(4)]
    return flat.view(mem_shape).permute(inverse).reshape(layout.shape)


def _fused_dropout_device(x: torch.Tensor) -> bool:
    # at::dropout's is_fused_kernel_acceptable (p is checked by the caller).
    return x.device.type in ('cuda', 'xpu', 'lazy', torch._C._get_privateuse1_backend_name())


def _dropout(x: torch.Tensor, p: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """``F.dropout(x, p, training=True)`` for ``0 < p < 1``, plus its keep mask.

    The same kernels and random draws as ``at::dropout``: ``native_dropout`` on
    CUDA-like devices, ``empty_like().bernoulli_(1 - p)`` scaled by
    ``1 / (1 - p)`` elsewhere. Same seed, same mask, same output.
    """
    if _fused_dropout_device(x) and x.numel():
        return torch.native_dropout(x, p, True)
    noise = torch.empty_like(x).bernoulli_(1 - p)
    noise.div_(1 - p)
    return x * noise, noise != 0


def _dropout_backward(grad: torch.Tensor, keep: torch.Tensor, p: float) -> torch.Tensor:
    if _fused_dropout_device(grad) and grad.numel():
        return torch.ops.aten.native_dropout_backward(grad, keep, 1.0 / (1 - p))
    noise = keep.to(grad.dtype)
    noise.div_(1 - p)  # the forward's noise, bit for bit
    return grad * noise


def _autocast_cast(t: Optional[torch.Tensor], device_type: str) -> Optional[torch.Tensor]:
    """The cast autocast applies to a lower-precision op's tensor argument."""
    if t is None or not torch.is_autocast_enabled(device_type):
        return t
    if t.is_floating_point() and t.dtype != torch.float64:
        return t.to(torch.get_autocast_dtype(device_type))
    return t


# ---------------------------------------------------- explicit attention core
class _Attention(Function):
    """Attention with stored (8-bit) probabilities, in one of torch's two op
    sequences:

    ``'mha'``   ``F.multi_head_attention_forward(need_weights=True)``, tensors
                ``(B * H, N, D)``: ``q * scale``, ``baddbmm``/``bmm``,
                ``softmax``, dropout, ``bmm``.
    ``'math'``  the math backend of ``scaled_dot_product_attention``, tensors
                ``(B, H, N, D)``: ``q * s``, ``k^T * s`` (``s = scale**0.5``),
                ``matmul``, ``+ mask``, ``_safe_softmax``, dropout, ``matmul``;
                fp16/bf16 inputs are computed in float32 (unless torch's
                ``allow_fp16_bf16_reduction_math_sdp``), as torch does.

    Returns the attention output and the (dropped-out) probabilities.
    """

    @staticmethod
    def forward(ctx, q, k, v, mask, variant, scale, dropout_p, heads, quantizers):
        ctx.set_materialize_grads(False)
        quant_q, quant_k, quant_v, quant_p = quantizers
        in_dtype = q.dtype
        if variant == 'mha':
            qs = q * scale
            kt = k.transpose(-2, -1)
            if mask is not None:
                scores = torch.baddbmm(mask, qs, kt)
            else:
                scores = torch.bmm(qs, kt)
            probs = F.softmax(scores, dim=-1)
        else:
            if (in_dtype in (torch.float16, torch.bfloat16)
                    and not torch.backends.cuda.fp16_bf16_reduction_math_sdp_allowed()):
                q, k, v = q.float(), k.float(), v.float()
            qs = q * scale
            kt = k.transpose(-2, -1) * scale
            scores = torch.matmul(qs, kt)
            if mask is not None:
                scores = scores + mask
            probs = torch.ops.aten._safe_softmax(scores, -1)
        keep = None
        dropped = probs
        if dropout_p > 0.0:
            dropped, keep = _dropout(probs, dropout_p)
        if variant == 'mha':
            out = torch.bmm(dropped, v)
        else:
            out = torch.matmul(dropped, v)
            # torch returns the probabilities in the input dtype too.
            out, dropped = out.to(in_dtype), dropped.to(in_dtype)

        need_q, need_k, need_v, need_mask = ctx.needs_input_grad[:4]
        need_scores = need_q or need_k or need_mask
        saved: list = []
        layouts: list = []
        # d(scores)/dq reads k, d(scores)/dk reads q; the softmax backward reads
        # the probabilities, the probability gradient reads v.
        for flag, quantizer, t in ((need_k, quant_q, q), (need_q, quant_k, k),
                                   (need_scores, quant_v, v),
                                   (need_scores or need_v, quant_p, probs)):
            if flag:
                packed, layout = _pack_heads(quantizer, t, heads)
                saved += packed.tensors
                layouts.append(layout)
            else:
                saved += [None, None, None]
                layouts.append(None)
        saved.append(pack_bits(keep) if keep is not None else None)
        ctx.save_for_backward(*saved)
        ctx.meta = (variant, scale, dropout_p, heads, layouts, probs.dtype, scores.dtype,
                    out.dtype if variant == 'mha' else q.dtype, in_dtype,
                    None if mask is None else (mask.shape, mask.dtype))
        return out, dropped

    @staticmethod
    def backward(ctx, g_out, g_dropped):
        (variant, scale, p, heads, layouts, p_dtype, s_dtype, o_dtype, in_dtype,
         mask_meta) = ctx.meta
        saved = ctx.saved_tensors
        need_q, need_k, need_v, need_mask = ctx.needs_input_grad[:4]
        mm = torch.bmm if variant == 'mha' else torch.matmul
        # 'mha': the scores' scale sits on q only; 'math': on q and on k.
        k_scale = 1.0 if variant == 'mha' else scale

        def load(i, dtype):
            return _unpack_heads(saved[3 * i:3 * i + 3], layouts[i], heads, dtype)

        nothing = (None,) * 5
        probs = load(3, p_dtype)
        keep = unpack_bits(saved[12], probs.shape) if p > 0.0 else None
        gv = g_drop = None
        if g_out is not None:
            g_out = g_out.to(o_dtype)
            if need_v:
                dropped = _dropout_forward_from(probs, keep, p) if keep is not None else probs
                gv = mm(dropped.to(o_dtype).transpose(-2, -1), g_out).to(in_dtype)
            if need_q or need_k or need_mask:
                v = load(2, o_dtype)
                g_drop = mm(g_out, v.transpose(-2, -1)).to(p_dtype)
        if g_dropped is not None and (need_q or need_k or need_mask):
            g_dropped = g_dropped.to(p_dtype)
            g_drop = g_dropped if g_drop is None else g_drop + g_dropped
        if g_drop is None:
            return (None, None, gv, None) + nothing
        g_probs = _dropout_backward(g_drop, keep, p) if keep is not None else g_drop
        g_scores = torch._softmax_backward_data(g_probs, probs, -1, p_dtype).to(s_dtype)
        gq = gk = gmask = None
        if need_q:
            k = load(1, s_dtype)
            gq = (mm(g_scores, k * k_scale if k_scale != 1.0 else k) * scale).to(in_dtype)
        if need_k:
            qs = load(0, s_dtype) * scale
            gk = (mm(g_scores.transpose(-2, -1), qs) * k_scale).to(in_dtype)
        if need_mask:
            mask_shape, mask_dtype = mask_meta
            gmask = g_scores.sum_to_size(mask_shape).to(mask_dtype)
        return (gq, gk, gv, gmask) + nothing


def _dropout_forward_from(probs: torch.Tensor, keep: torch.Tensor, p: float) -> torch.Tensor:
    """The dropped-out probabilities from the kept mask (for backward)."""
    if _fused_dropout_device(probs) and probs.numel():
        return torch.ops.aten.native_dropout_backward(probs, keep, 1.0 / (1 - p))
    noise = keep.to(probs.dtype)
    noise.div_(1 - p)
    return probs * noise


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
              variant: str, scale: float, dropout_p: float, heads: int,
              quantizers: Sequence[ActivationQuantizer]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Exact attention (see :class:`_Attention`) storing q, k, v and the
    probabilities in 8 bits (one group per head) and the dropout mask in 1 bit.

    Returns:
        tuple[Tensor, Tensor]: the output and the dropped-out probabilities.
    """
    if variant not in ('mha', 'math'):
        raise ValueError(f"variant must be 'mha' or 'math', got {variant!r}")
    return _Attention.apply(q, k, v, mask, variant, scale, dropout_p, heads, tuple(quantizers))


# ------------------------------------------------------- fused attention core
class _FusedAttention(Function):
    """torch's fused SDPA kernel followed by the out-projection of
    ``F.multi_head_attention_forward``. q, k, v and the attention output are
    saved in 8 bits (the output's copy also serves the out-projection's weight
    gradient), plus the kernel's per-row log-sum-exp."""

    @staticmethod
    def forward(ctx, q, k, v, mask, out_w, out_b, backend, dropout_p, is_causal, tgt_len,
                bsz, quantizers):
        quant_q, quant_k, quant_v, quant_o = quantizers
        kernel_state = ()
        if q.device.type == 'cpu':
            with torch.autocast('cpu', enabled=False):
                out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                    q, k, v, dropout_p, is_causal, attn_mask=mask)
        elif backend == _SDP_FLASH:
            head_dim = q.shape[-1]
            (out, lse, cum_q, cum_k, max_q, max_k, rng_state, unused,
             _) = torch.ops.aten._scaled_dot_product_flash_attention(
                 q, k, v, dropout_p, is_causal, False, scale=1.0 / math.sqrt(head_dim))
            kernel_state = (cum_q, cum_k, rng_state, unused)
            ctx.max_qk = (max_q, max_k)
        else:  # memory-efficient (no mask: the caller checks)
            out, lse, seed, offset = torch.ops.aten._scaled_dot_product_efficient_attention(
                q, k, v, None, True, dropout_p, is_causal)
            kernel_state = (seed, offset)
        embed_dim = q.shape[1] * q.shape[3]
        x = out.permute(2, 0, 1, 3).reshape(bsz * tgt_len, embed_dim)
        y = F.linear(x, out_w, out_b)  # autocast casts as in torch's forward

        heads = q.shape[1]
        packed = [_pack_heads(quant, t, heads) for quant, t in
                  ((quant_q, q), (quant_k, k), (quant_v, v), (quant_o, out))]
        ctx.save_for_backward(*[t for p, _ in packed for t in p.tensors], lse, mask, out_w,
                              *kernel_state)
        ctx.meta = (backend, dropout_p, is_causal, tgt_len, bsz, [lay for _, lay in packed],
                    q.dtype, y.dtype, out_b is not None, q.device.type, len(kernel_state))
        return y

    @staticmethod
    def backward(ctx, gy):
        (backend, p, is_causal, tgt_len, bsz, layouts, dtype, y_dtype, has_bias, device_type,
         n_state) = ctx.meta
        saved = ctx.saved_tensors
        heads = layouts[0].shape[1]
        q, k, v, out = (_unpack_heads(saved[3 * i:3 * i + 3], layouts[i], heads, dtype)
                        for i in range(4))
        lse, mask, out_w = saved[12:15]
        state = saved[15:15 + n_state]
        need = ctx.needs_input_grad
        heads, head_dim_v = out.shape[1], out.shape[3]
        embed_dim = heads * head_dim_v
        gy = gy.reshape(-1, gy.shape[-1]).to(y_dtype)
        gw = gb = None
        if need[4]:
            x = out.permute(2, 0, 1, 3).reshape(bsz * tgt_len, embed_dim).to(y_dtype)
            gw = gy.t().mm(x).to(out_w.dtype)
        if has_bias and need[5]:
            gb = gy.sum(0).to(out_w.dtype)
        gq = gk = gv = None
        if need[0] or need[1] or need[2]:
            gx = gy.mm(out_w.to(y_dtype)).to(dtype)
            g_out = gx.view(tgt_len, bsz, heads, head_dim_v).permute(1, 2, 0, 3)
            if device_type == 'cpu':
                gq, gk, gv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
                    g_out, q, k, v, out, lse, p, is_causal, attn_mask=mask)
            elif backend == _SDP_FLASH:
                cum_q, cum_k, rng_state, unused = state
                max_q, max_k = ctx.max_qk
                gq, gk, gv = torch.ops.aten._scaled_dot_product_flash_attention_backward(
                    g_out, q, k, v, out, lse, cum_q, cum_k, max_q, max_k, p, is_causal,
                    rng_state, unused, scale=1.0 / math.sqrt(q.shape[-1]))
            else:
                seed, offset = state
                gq, gk, gv, _ = torch.ops.aten._scaled_dot_product_efficient_attention_backward(
                    g_out, q, k, v, None, out, lse, seed, offset, p,
                    [need[0], need[1], need[2], False], is_causal)
        return gq, gk, gv, None, gw, gb, None, None, None, None, None, None


def _fused_backend(q, k, v, mask, dropout_p, is_causal) -> Optional[int]:
    """The fused SDPA kernel torch picks for these inputs, when this module
    replicates it; None for the math backend and kernels it does not."""
    if q.device.type not in ('cpu', 'cuda'):
        return None
    choice = torch._fused_sdp_choice(q, k, v, mask, dropout_p, is_causal)
    if q.device.type == 'cpu':
        return _SDP_FLASH if choice == _SDP_FLASH else None
    if choice == _SDP_FLASH and q.shape[-1] % 8 == 0 and v.shape[-1] % 8 == 0:
        return _SDP_FLASH  # (torch pads other head sizes first)
    if choice == _SDP_EFFICIENT and mask is None:
        return _SDP_EFFICIENT  # (torch pads and expands a mask first)
    return None


def fused_attention(q, k, v, mask, out_w, out_b, backend: int, dropout_p: float,
                    is_causal: bool, tgt_len: int, bsz: int,
                    quantizers: Sequence[ActivationQuantizer]) -> torch.Tensor:
    """``scaled_dot_product_attention`` with torch's fused ``backend`` (from
    :func:`_fused_backend`), then ``F.multi_head_attention_forward``'s
    out-projection; returns its ``(tgt_len * bsz, E)`` output. Exact; q, k, v
    and the attention output are stored in 8 bits (one group per head)."""
    return _FusedAttention.apply(q, k, v, mask, out_w, out_b, backend, dropout_p, is_causal,
                                 tgt_len, bsz, tuple(quantizers))


# ------------------------------------------------------------------ the module
class MesaMultiheadAttention(MesaModule, nn.MultiheadAttention):
    """:class:`torch.nn.MultiheadAttention` storing its activations in 8 bits.

    Same constructor arguments, parameters and ``state_dict`` keys as torch's
    class (``in_proj_weight``/``in_proj_bias`` or ``q/k/v_proj_weight`` when
    ``kdim``/``vdim`` differ, ``out_proj.*``, ``bias_k``/``bias_v``), plus the
    buffers of its quantizers, and ``mesa_config``/``enabled`` (see
    :class:`MesaModule`). ``forward`` takes torch's arguments (``key_padding_mask``,
    ``need_weights``, ``attn_mask``, ``average_attn_weights``, ``is_causal``) and
    returns what torch returns, bit for bit, in training mode.

    Quantizers (see the module docstring for which path uses which):
    ``quantizer_in_q``/``_in_k``/``_in_v``: the in-projection inputs, channel
    groups of ``mesa_config.groups``; ``quantizer_q``/``_k``/``_v``,
    ``quantizer_attn`` (probabilities) and ``quantizer_out`` (attention output,
    the out-projection's input): one group per head, always.
    """
    _float_type = nn.MultiheadAttention
    _quantized = ('quantizer_in_q', 'quantizer_in_k', 'quantizer_in_v', 'quantizer_q',
                  'quantizer_k', 'quantizer_v', 'quantizer_attn', 'quantizer_out')

    def _init_mesa(self, config: Optional[QuantizerConfig] = None,
                   enabled: bool = True) -> None:
        config = QuantizerConfig() if config is None else config
        for what, size in (('embed_dim', self.embed_dim), ('kdim', self.kdim),
                           ('vdim', self.vdim)):
            if size % config.groups:
                raise ValueError(f'{type(self).__name__}: groups={config.groups} does not '
                                 f'divide {what}={size}')
        self.mesa_enabled = enabled
        per_head = dataclasses.replace(config, groups=self.num_heads)
        for name in self._quantized:
            if name.startswith('quantizer_in_'):
                self.add_module(name, ActivationQuantizer(config, -1))
            else:
                self.add_module(name, ActivationQuantizer(per_head, 1))

    def _channels(self) -> Optional[int]:
        return self.embed_dim

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: Optional[torch.Tensor] = None, need_weights: bool = True,
                attn_mask: Optional[torch.Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """As :meth:`torch.nn.MultiheadAttention.forward`."""
        if (not self._use_mesa(query, key, value) or self.dropout >= 1.0
                or query.is_nested or key.is_nested or value.is_nested):
            return super().forward(query, key, value, key_padding_mask, need_weights,
                                   attn_mask, average_attn_weights, is_causal)
        # nn.MultiheadAttention.forward's non-fast path, step by step.
        is_batched = query.dim() == 3
        key_padding_mask = F._canonical_mask(
            mask=key_padding_mask, mask_name='key_padding_mask',
            other_type=F._none_or_dtype(attn_mask), other_name='attn_mask',
            target_type=query.dtype)
        attn_mask = F._canonical_mask(
            mask=attn_mask, mask_name='attn_mask', other_type=None, other_name='',
            target_type=query.dtype, check_other=False)
        if self.batch_first and is_batched:
            # The identities q is k is v decide the in-projection: keep them.
            if key is value:
                if query is key:
                    query = key = value = query.transpose(1, 0)
                else:
                    query, key = (x.transpose(1, 0) for x in (query, key))
                    value = key
            else:
                query, key, value = (x.transpose(1, 0) for x in (query, key, value))
        out, weights = self._mha_forward(query, key, value, key_padding_mask, need_weights,
                                         attn_mask, average_attn_weights, is_causal)
        if self.batch_first and is_batched:
            return out.transpose(1, 0), weights
        return out, weights

    def _mha_forward(self, query, key, value, key_padding_mask, need_weights, attn_mask,
                     average_attn_weights, is_causal):
        """``F.multi_head_attention_forward`` (training mode) with the Mesa ops."""
        num_heads = self.num_heads
        is_batched = F._mha_shape_check(query, key, value, key_padding_mask, attn_mask,
                                        num_heads)
        if not is_batched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        tgt_len, bsz, embed_dim = query.shape
        src_len = key.shape[0]
        key_padding_mask = F._canonical_mask(
            mask=key_padding_mask, mask_name='key_padding_mask',
            other_type=F._none_or_dtype(attn_mask), other_name='attn_mask',
            target_type=query.dtype)
        if is_causal and attn_mask is None:
            raise RuntimeError(
                'Need attn_mask if specifying the is_causal hint. You may use the '
                'Transformer module method `generate_square_subsequent_mask` to create '
                'this mask.')
        if is_causal and key_padding_mask is None and not need_weights:
            attn_mask = None
        else:
            attn_mask = F._canonical_mask(
                mask=attn_mask, mask_name='attn_mask', other_type=None, other_name='',
                target_type=query.dtype, check_other=False)
            if key_padding_mask is not None:
                is_causal = False
        if embed_dim != self.embed_dim:
            raise AssertionError(f'was expecting embedding dimension of {self.embed_dim}, '
                                 f'but got {embed_dim}')
        head_dim = embed_dim // num_heads
        if self._qkv_same_embed_dim:
            if key.shape != value.shape:
                raise AssertionError(f'key shape {key.shape} does not match value shape '
                                     f'{value.shape}')
        elif key.shape[:2] != value.shape[:2]:
            raise AssertionError(f"key's sequence and batch dims {key.shape[:2]} do not "
                                 f"match value's {value.shape[:2]}")

        q, k, v = self._in_projection(query, key, value)

        if attn_mask is not None:
            if attn_mask.dim() == 2:
                if attn_mask.shape != (tgt_len, src_len):
                    raise RuntimeError(f'The shape of the 2D attn_mask is {attn_mask.shape}, '
                                       f'but should be {(tgt_len, src_len)}.')
                attn_mask = attn_mask.unsqueeze(0)
            elif attn_mask.dim() == 3:
                if attn_mask.shape != (bsz * num_heads, tgt_len, src_len):
                    raise RuntimeError(
                        f'The shape of the 3D attn_mask is {attn_mask.shape}, but should be '
                        f'{(bsz * num_heads, tgt_len, src_len)}.')
            else:
                raise RuntimeError(f"attn_mask's dimension {attn_mask.dim()} is not supported")
        if self.bias_k is not None and self.bias_v is not None:
            k = torch.cat([k, self.bias_k.repeat(1, bsz, 1)])
            v = torch.cat([v, self.bias_v.repeat(1, bsz, 1)])
            if attn_mask is not None:
                attn_mask = F.pad(attn_mask, (0, 1))
            if key_padding_mask is not None:
                key_padding_mask = F.pad(key_padding_mask, (0, 1))
        q = q.view(tgt_len, bsz * num_heads, head_dim).transpose(0, 1)
        k = k.view(k.shape[0], bsz * num_heads, head_dim).transpose(0, 1)
        v = v.view(v.shape[0], bsz * num_heads, head_dim).transpose(0, 1)
        if self.add_zero_attn:
            zero_attn_shape = (bsz * num_heads, 1, head_dim)
            k = torch.cat([k, torch.zeros(zero_attn_shape, dtype=k.dtype, device=k.device)],
                          dim=1)
            v = torch.cat([v, torch.zeros(zero_attn_shape, dtype=v.dtype, device=v.device)],
                          dim=1)
            if attn_mask is not None:
                attn_mask = F.pad(attn_mask, (0, 1))
            if key_padding_mask is not None:
                key_padding_mask = F.pad(key_padding_mask, (0, 1))
        src_len = k.size(1)
        if key_padding_mask is not None:
            F._check_key_padding_mask(key_padding_mask, src_len, bsz)
            key_padding_mask = (key_padding_mask.view(bsz, 1, 1, src_len)
                                .expand(-1, num_heads, -1, -1)
                                .reshape(bsz * num_heads, 1, src_len))
            attn_mask = key_padding_mask if attn_mask is None else attn_mask + key_padding_mask
        dropout_p = self.dropout

        quant_core = (self.quantizer_q, self.quantizer_k, self.quantizer_v, self.quantizer_attn)
        if need_weights:
            if is_causal and attn_mask is None:
                raise AssertionError('FIXME: is_causal not implemented for need_weights')
            scale = math.sqrt(1.0 / float(q.shape[-1]))
            out, weights = attention(q, k, v, attn_mask, 'mha', scale, dropout_p, num_heads,
                                     quant_core)
            out = out.transpose(0, 1).reshape(tgt_len * bsz, embed_dim)
            out = self._out_projection(out).view(tgt_len, bsz, -1)
            weights = weights.view(bsz, num_heads, tgt_len, src_len)
            if average_attn_weights:
                weights = weights.mean(dim=1)
            if not is_batched:
                out, weights = out.squeeze(1), weights.squeeze(0)
            return out, weights

        if attn_mask is not None:
            if attn_mask.size(0) == 1 and attn_mask.dim() == 3:
                attn_mask = attn_mask.unsqueeze(0)
            else:
                attn_mask = attn_mask.view(bsz, num_heads, -1, src_len)
        q = q.view(bsz, num_heads, tgt_len, head_dim)
        k = k.view(bsz, num_heads, src_len, head_dim)
        v = v.view(bsz, num_heads, src_len, head_dim)
        out = self._sdpa_and_out_projection(q, k, v, attn_mask, dropout_p, is_causal,
                                            tgt_len, bsz, embed_dim)
        out = out.view(tgt_len, bsz, -1)
        if not is_batched:
            out = out.squeeze(1)
        return out, None

    def _in_projection(self, query, key, value):
        """``F._in_projection_packed`` / ``F._in_projection`` (same branches)."""
        quants = (self.quantizer_in_q, self.quantizer_in_k, self.quantizer_in_v)
        b = self.in_proj_bias
        if not self._qkv_same_embed_dim:
            b_q, b_k, b_v = (None, None, None) if b is None else b.chunk(3)
            return in_projection((query, key, value), (self.q_proj_weight, self.k_proj_weight,
                                                       self.v_proj_weight),
                                 (b_q, b_k, b_v), quants)
        w, E = self.in_proj_weight, query.size(-1)
        if key is value:
            if query is key:  # self-attention: one packed projection
                (proj,) = in_projection((query,), (w,), (b,), quants[:1])
                proj = (proj.unflatten(-1, (3, E)).unsqueeze(0).transpose(0, -2)
                        .squeeze(-2).contiguous())
                return proj[0], proj[1], proj[2]
            w_q, w_kv = w.split([E, E * 2])
            b_q, b_kv = (None, None) if b is None else b.split([E, E * 2])
            q_proj, kv_proj = in_projection((query, key), (w_q, w_kv), (b_q, b_kv), quants[:2])
            kv_proj = (kv_proj.unflatten(-1, (2, E)).unsqueeze(0).transpose(0, -2)
                       .squeeze(-2).contiguous())
            return q_proj, kv_proj[0], kv_proj[1]
        w_q, w_k, w_v = w.chunk(3)
        b_q, b_k, b_v = (None, None, None) if b is None else b.chunk(3)
        return in_projection((query, key, value), (w_q, w_k, w_v), (b_q, b_k, b_v), quants)

    def _out_projection(self, x):
        (y,) = in_projection((x,), (self.out_proj.weight,), (self.out_proj.bias,),
                             (self.quantizer_out,))
        return y

    def _sdpa_and_out_projection(self, q, k, v, attn_mask, dropout_p, is_causal, tgt_len,
                                 bsz, embed_dim):
        """``scaled_dot_product_attention`` + permute + out-projection, with the
        kernel torch would pick (see the module docstring)."""
        device_type = q.device.type
        # Autocast casts SDPA's tensor arguments, then runs the kernel below it.
        qc, kc, vc, mc = (_autocast_cast(t, device_type) for t in (q, k, v, attn_mask))
        mask_grad = mc is not None and mc.requires_grad
        backend = None if mask_grad else _fused_backend(qc, kc, vc, mc, dropout_p, is_causal)
        if backend is not None:
            return fused_attention(
                qc, kc, vc, mc, self.out_proj.weight, self.out_proj.bias, backend, dropout_p,
                is_causal, tgt_len, bsz,
                (self.quantizer_q, self.quantizer_k, self.quantizer_v, self.quantizer_out))
        if not is_causal and torch._fused_sdp_choice(qc, kc, vc, mc, dropout_p,
                                                     is_causal) == _SDP_MATH:
            with torch.autocast(device_type, enabled=False):
                scale = math.sqrt(1.0 / math.sqrt(q.shape[-1]))
                out, _ = attention(qc, kc, vc, mc, 'math', scale, dropout_p, self.num_heads,
                                   (self.quantizer_q, self.quantizer_k, self.quantizer_v,
                                    self.quantizer_attn))
        else:  # a kernel not replicated here: torch's own, in full precision
            out = F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal)
        out = out.permute(2, 0, 1, 3).reshape(bsz * tgt_len, embed_dim)
        return self._out_projection(out)
