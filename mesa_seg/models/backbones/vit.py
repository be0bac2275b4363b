"""Vision Transformer (ViT / DeiT) backbone trained with Mesa 8-bit activations.

An Image is Worth 16x16 Words: Transformers for Image Recognition at Scale
(Dosovitskiy et al., ICLR 2021, https://arxiv.org/abs/2010.11929), trained with
Mesa: A Memory-saving Training Framework for Transformers
(Pan et al., 2021, https://arxiv.org/abs/2111.11124).

This reuses mmsegmentation 1.2.2's ``VisionTransformer`` unchanged: its
attention (mmcv's ``MultiheadAttention``) wraps ``torch.nn.MultiheadAttention``,
which the Mesa converter turns into
:class:`~mesa_seg.mesa.attention.MesaMultiheadAttention` (bit-identical forward,
q/k/v and probabilities stored in 8 bits, one group per head; q, k and v come
from one input, quantized once). Only the blocks' activation checkpointing
changes (``with_cp`` through
:func:`~mesa_seg.models.activation_checkpoint.checkpoint_block`). Constructor
arguments and ``state_dict`` keys are mmseg's (plus Mesa's quantizer buffers),
so mmseg's checkpoints and ``vit2mmseg``-converted DeiT/ViT weights load
unchanged (``init_cfg``, ``pretrained``, position-embedding resizing included).
"""
from typing import Union

import torch
from mmcv.cnn.bricks.transformer import MultiheadAttention
from mmseg.models.backbones.vit import (TransformerEncoderLayer,
                                        VisionTransformer)
from mmseg.registry import MODELS

from ...mesa import MesaPolicy, mesafy_
from ..activation_checkpoint import check_with_cp, checkpoint_block
from ..torch_layers import mmcv_to_torch_layers_
from .store_once import store_once_ffns_

__all__ = [
    'CheckpointViTBlock', 'FusedMultiheadAttention', 'MesaVisionTransformer',
    'VIT_MESA_DEFAULTS'
]

# Mesa's recipe for ViT/DeiT (the paper's DeiT setting): every layer type, one
# group per head, the patch embedding in full precision (its conv input is the
# image batch, alive for the whole step anyway).
VIT_MESA_DEFAULTS = dict(groups='heads', exclude=(r'^patch_embed\.', ))


class FusedMultiheadAttention(MultiheadAttention):
    """mmcv's ``MultiheadAttention`` calling torch's attention with
    ``need_weights=False`` (mmcv discards the weights it asks for), so that
    ``scaled_dot_product_attention`` runs: a fused kernel that never forms the
    ``N x N`` probabilities, and under Mesa stores q, k, v and the output in 8
    bits. A class swap: same modules and ``state_dict``."""

    def forward(self, query, key=None, value=None, identity=None, query_pos=None,
                key_pos=None, attn_mask=None, key_padding_mask=None, **kwargs):
        # mmcv's MultiheadAttention.forward but for need_weights
        key = query if key is None else key
        value = key if value is None else value
        identity = query if identity is None else identity
        if key_pos is None and query_pos is not None and query_pos.shape == key.shape:
            key_pos = query_pos
        if query_pos is not None:
            query = query + query_pos
        if key_pos is not None:
            key = key + key_pos
        if self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        out = self.attn(query=query, key=key, value=value, attn_mask=attn_mask,
                        key_padding_mask=key_padding_mask, need_weights=False)[0]
        if self.batch_first:
            out = out.transpose(0, 1)
        return identity + self.dropout_layer(self.proj_drop(out))


class CheckpointViTBlock(TransformerEncoderLayer):
    """mmseg's ViT ``TransformerEncoderLayer`` checkpointed through
    :func:`checkpoint_block` (a class swap: same modules and ``state_dict``).

    ``with_cp`` may also be ``'selective'``; ``True`` runs torch's
    non-reentrant checkpoint where mmseg calls the reentrant one (same outputs
    and gradients; under Mesa the recomputation quantizes as the forward did).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return checkpoint_block(self._forward, x, mode=self.with_cp, state=self)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        # mmseg's TransformerEncoderLayer.forward._inner_forward
        x = self.attn(self.norm1(x), identity=x)
        return self.ffn(self.norm2(x), identity=x)


@MODELS.register_module()
class MesaVisionTransformer(VisionTransformer):
    """ViT/DeiT backbone with Mesa memory-saving activations.

    Takes every argument of :class:`mmseg.models.backbones.VisionTransformer`
    (img_size, patch_size, patch_pad, in_channels, embed_dims, num_layers,
    num_heads, mlp_ratio, out_origin, out_indices, qkv_bias, drop_rate,
    attn_drop_rate, drop_path_rate, with_cls_token, output_cls_token,
    norm_cfg, act_cfg, patch_norm, patch_bias, pre_norm, final_norm,
    interpolate_mode, num_fcs, norm_eval, with_cp, frozen_exclude, pretrained,
    init_cfg) with the same meaning and defaults, plus ``mesa``; ``with_cp``
    also takes ``'selective'``. The forward pass is exact; in training, each
    converted layer keeps only an 8-bit copy of what its backward reads. With
    ``mesa=None`` this is a drop-in for mmseg's class.

    Every block exposes ``num_heads``, so with ``groups='heads'`` its
    LayerNorm, Linear and GELU inputs get one channel group per head; the
    attention tensors always get one group per head. The pre- and final norms
    sit outside the blocks: one group. ``norm_eval=True`` puts the LayerNorms
    in eval mode, as mmseg does, which runs them in full precision. With
    ``drop_rate == 0`` the MLP's hidden activation is stored once, as GELU's
    input (:class:`~.store_once.StoreOnceFFN`).

    Args:
        *args: Positional arguments of ``VisionTransformer``.
        fused_attention (bool): False: attention as mmseg calls it
            (``need_weights=True``: torch's explicit path, which forms the
            ``N x N`` probabilities; Mesa stores them in 8 bits), outputs
            bit-identical to mmseg's model. True: ``need_weights=False``
            (:class:`FusedMultiheadAttention`), torch's fused
            ``scaled_dot_product_attention``: no ``N x N`` tensor is stored
            (Mesa or not); the same attention up to float rounding (a
            different kernel), bit-identical to torch's SDPA. Default: False.
        mesa (dict | MesaPolicy | None): Mesa policy. A dict (config style)
            updates :data:`VIT_MESA_DEFAULTS` (every layer type, one group per
            head, the patch embedding in full precision); unknown keys raise.
            A ``MesaPolicy`` is used as given. ``None`` or
            ``dict(enabled=False)`` keeps mmseg's plain FP32 layers.
            Default: ``dict()``.
        **kwargs: Keyword arguments of ``VisionTransformer``. ``with_cp``:
            False, True or ``'selective'`` (see
            :class:`~mesa_seg.models.backbones.mit.MesaMixVisionTransformer`).
            Default: False.
    """

    def __init__(self,
                 *args,
                 fused_attention: bool = False,
                 mesa: Union[dict, MesaPolicy, None] = dict(),
                 **kwargs):
        check_with_cp(kwargs.get('with_cp', False))
        super().__init__(*args, **kwargs)
        self.fused_attention = fused_attention
        for layer in self.layers:
            layer.with_cp = check_with_cp(layer.with_cp)  # also positional
            layer.__class__ = CheckpointViTBlock
            layer.num_heads = layer.attn.num_heads
            if fused_attention:
                layer.attn.__class__ = FusedMultiheadAttention
        policy = MesaPolicy.from_arg(mesa, VIT_MESA_DEFAULTS)
        if policy.enabled:
            mmcv_to_torch_layers_(self)
            # Leave torch's RNG as it was (the quantizers draw their rounding
            # salts from it), so init_weights() draws mmseg's initial weights.
            with torch.random.fork_rng(devices=[]):
                mesafy_(self, policy)
            store_once_ffns_(self)
