"""SegFormer's Mix Transformer (MiT) backbone trained with Mesa 8-bit activations.

SegFormer: Simple and Efficient Design for Semantic Segmentation with
Transformers (Xie et al., NeurIPS 2021, https://arxiv.org/abs/2105.15203),
trained with Mesa: A Memory-saving Training Framework for Transformers
(Pan et al., 2021, https://arxiv.org/abs/2111.11124).

This reuses mmsegmentation 1.2.2's ``MixVisionTransformer`` unchanged: its
attention is ``torch.nn.MultiheadAttention``, which the Mesa converter turns
into :class:`~mesa_seg.mesa.attention.MesaMultiheadAttention` (bit-identical
forward, q/k/v and probabilities stored in 8 bits, one group per head). Only
the blocks' activation checkpointing changes (``with_cp`` through
:func:`~mesa_seg.models.activation_checkpoint.checkpoint_block`). Constructor
arguments and ``state_dict`` keys are mmseg's (plus Mesa's quantizer buffers),
so mmseg's SegFormer checkpoints and ``mit2mmseg``-converted ImageNet weights
load unchanged.
"""
import dataclasses
from typing import Union

import torch
from mmseg.models.backbones.mit import (EfficientMultiheadAttention,
                                        MixVisionTransformer,
                                        TransformerEncoderLayer)
from mmseg.models.utils import nchw_to_nlc, nlc_to_nchw
from mmseg.registry import MODELS
from torch import nn

from ...mesa import MesaGELU, MesaPolicy, mesafy_
from ..activation_checkpoint import check_with_cp, checkpoint_block
from ..torch_layers import mmcv_to_torch_layers_
from .store_once import StoreOnceMixFFN, store_once_ffns_

__all__ = [
    'ChannelsFirstMesaGELU', 'CheckpointMiTBlock', 'FusedEfficientMultiheadAttention',
    'StoreOnceMixFFN', 'MesaMixVisionTransformer', 'MIT_MESA_DEFAULTS', 'apply_mit_mesa_'
]

# Mesa's recipe for MiT: every layer type, one group per head, except the
# first patch embedding's conv: its input is the image batch, alive for the
# whole step anyway, so an 8-bit copy would only add memory. Its LayerNorm,
# whose input at 1/4 resolution outweighs the image, is compressed (Swin's
# recipe keeps it in full precision; here that would leave a large share of
# MiT-B0's saved bytes uncompressed). Later patch embeddings read stage outputs.
MIT_MESA_DEFAULTS = dict(groups='heads', exclude=(r'^layers\.0\.0\.projection$', ))

# MixFFN registers its GELU twice (``activate`` and ``layers.2``).
_FFN_GELU = r'\.ffn\.(activate|layers\.2)$'


class ChannelsFirstMesaGELU(MesaGELU):
    """:class:`~mesa_seg.mesa.MesaGELU` for ``(B, C, H, W)`` inputs: its groups
    lie along the channels (dim 1), not the last (width) axis. MixFFN applies
    GELU between convolutions."""
    _group_dim = 1


class FusedEfficientMultiheadAttention(EfficientMultiheadAttention):
    """mmseg's ``EfficientMultiheadAttention`` calling torch's attention with
    ``need_weights=False`` (mmseg discards the weights it asks for), so that
    ``scaled_dot_product_attention`` runs: a fused kernel that never forms the
    ``N x M`` probabilities, and under Mesa stores q, k, v and the output in 8
    bits. A class swap: same modules and ``state_dict``."""

    def forward(self, x: torch.Tensor, hw_shape, identity=None) -> torch.Tensor:
        # mmseg's EfficientMultiheadAttention.forward but for need_weights
        x_q = x
        if self.sr_ratio > 1:
            x_kv = nchw_to_nlc(self.sr(nlc_to_nchw(x, hw_shape)))
            x_kv = self.norm(x_kv)
        else:
            x_kv = x
        if identity is None:
            identity = x_q
        if self.batch_first:
            x_q, x_kv = x_q.transpose(0, 1), x_kv.transpose(0, 1)
        out = self.attn(query=x_q, key=x_kv, value=x_kv, need_weights=False)[0]
        if self.batch_first:
            out = out.transpose(0, 1)
        return identity + self.dropout_layer(self.proj_drop(out))


class CheckpointMiTBlock(TransformerEncoderLayer):
    """mmseg's MiT ``TransformerEncoderLayer`` checkpointed through
    :func:`checkpoint_block` (a class swap: same modules and ``state_dict``).

    ``with_cp`` may also be ``'selective'``. ``with_cp=True`` runs torch's
    non-reentrant checkpoint where mmseg calls the reentrant one: outputs and
    gradients are the same, and under Mesa the recomputation quantizes as the
    forward did.
    """

    def forward(self, x: torch.Tensor, hw_shape) -> torch.Tensor:
        return checkpoint_block(
            self._forward, x, hw_shape, mode=self.with_cp, state=self)

    def _forward(self, x: torch.Tensor, hw_shape) -> torch.Tensor:
        # mmseg's TransformerEncoderLayer.forward._inner_forward
        x = self.attn(self.norm1(x), hw_shape, identity=x)
        return self.ffn(self.norm2(x), hw_shape, identity=x)


def apply_mit_mesa_(model: MixVisionTransformer, policy: MesaPolicy) -> None:
    """Convert ``model``'s layers in place as ``policy`` says.

    mmcv's layer wrappers (MixFFN's and the spatial reduction's ``Conv2d``)
    become the torch classes :func:`mesafy_` converts; MixFFN's GELU, which
    sees ``(B, C, H, W)`` maps, becomes a :class:`ChannelsFirstMesaGELU`, and
    every ``MixFFN`` a :class:`StoreOnceMixFFN`.
    """
    if not policy.enabled:
        return
    mmcv_to_torch_layers_(model)
    store_once_ffns_(model)
    mesafy_(model, dataclasses.replace(policy, exclude=policy.exclude + (_FFN_GELU, )))
    if 'GELU' not in policy.layers:
        return
    for name, block in model.named_modules():
        if not isinstance(block, TransformerEncoderLayer):
            continue
        ffn = block.ffn
        names = (f'{name}.ffn.activate', f'{name}.ffn.layers.2')
        if type(ffn.activate) is not nn.GELU or not all(map(policy.selects, names)):
            continue
        if isinstance(policy.groups, int):
            groups = policy.groups
        elif policy.groups == 'heads':
            groups = block.num_heads
        else:  # 'channels'
            groups = ffn.feedforward_channels
        if ffn.feedforward_channels % groups:
            raise ValueError(f"Mesa: cannot convert '{names[0]}': groups={groups} does not "
                             f'divide the {ffn.feedforward_channels} channels of its input')
        gelu = ChannelsFirstMesaGELU.from_float(ffn.activate, policy.quantizer_config(groups))
        ffn.activate = ffn.layers[2] = gelu


@MODELS.register_module()
class MesaMixVisionTransformer(MixVisionTransformer):
    """SegFormer's MiT backbone with Mesa memory-saving activations.

    Takes every argument of :class:`mmseg.models.backbones.MixVisionTransformer`
    (in_channels, embed_dims, num_stages, num_layers, num_heads, patch_sizes,
    strides, sr_ratios, out_indices, mlp_ratio, qkv_bias, drop_rate,
    attn_drop_rate, drop_path_rate, act_cfg, norm_cfg, pretrained, init_cfg,
    with_cp) with the same meaning and defaults, plus ``mesa``; ``with_cp``
    also takes ``'selective'``. The forward pass is exact; in training, each
    converted layer keeps only an 8-bit copy of what its backward reads. With
    ``mesa=None`` this is a drop-in for mmseg's class.

    Each stage's blocks, block list and output norm expose the stage's
    ``num_heads``, so with ``groups='heads'`` the LayerNorm, conv and GELU
    inputs of a block get one channel group per head; the attention tensors
    (q, k, v, probabilities) always get one group per head. The patch
    embedding of stage ``i > 0`` groups its conv input by the heads of stage
    ``i - 1`` (whose output it reads) and its norm by those of stage ``i``.
    With ``drop_rate == 0`` the MixFFN's hidden map is stored once, as GELU's
    input (:class:`StoreOnceMixFFN`).

    Args:
        *args: Positional arguments of ``MixVisionTransformer``.
        fused_attention (bool): False: attention as mmseg calls it
            (``need_weights=True``: torch's explicit path, which forms the
            ``N x M`` probabilities; Mesa stores them in 8 bits), outputs
            bit-identical to mmseg's model. True: ``need_weights=False``
            (:class:`FusedEfficientMultiheadAttention`), torch's fused
            ``scaled_dot_product_attention``: no ``N x M`` tensor is stored
            (Mesa or not), less memory and time; the same attention up to
            float rounding (a different kernel), bit-identical to torch's
            SDPA. Default: False.
        mesa (dict | MesaPolicy | None): Mesa policy. A dict (config style)
            updates :data:`MIT_MESA_DEFAULTS` (every layer type, one group per
            head, the first patch embedding's conv, which reads the image, in
            full precision); unknown keys
            raise. A ``MesaPolicy`` is used as given. ``None`` or
            ``dict(enabled=False)`` keeps mmseg's plain FP32 layers.
            Default: ``dict()``.
        **kwargs: Keyword arguments of ``MixVisionTransformer``. ``with_cp``:
            False (no checkpointing), True (each block keeps only its input
            and is recomputed in backward) or ``'selective'`` (matmul, conv and
            attention outputs are kept, the rest recomputed); outputs and
            gradients are those of False, Mesa or not. Default: False.
    """

    def __init__(self,
                 *args,
                 fused_attention: bool = False,
                 mesa: Union[dict, MesaPolicy, None] = dict(),
                 **kwargs):
        check_with_cp(kwargs.get('with_cp', False))
        super().__init__(*args, **kwargs)
        self.fused_attention = fused_attention
        for i, (patch_embed, blocks, norm) in enumerate(self.layers):
            heads = self.num_heads[i]
            blocks.num_heads = norm.num_heads = heads
            if patch_embed.norm is not None:
                patch_embed.norm.num_heads = heads
            if i > 0:
                patch_embed.projection.num_heads = self.num_heads[i - 1]
            for block in blocks:
                block.with_cp = check_with_cp(block.with_cp)  # also positional
                block.__class__ = CheckpointMiTBlock
                block.num_heads = heads
                if fused_attention:
                    block.attn.__class__ = FusedEfficientMultiheadAttention
        policy = MesaPolicy.from_arg(mesa, MIT_MESA_DEFAULTS)
        # The quantizers' rounding salts are drawn from torch's RNG: leave it as
        # it was, so init_weights() draws the weights mmseg's model would.
        with torch.random.fork_rng(devices=[]):
            apply_mit_mesa_(self, policy)
