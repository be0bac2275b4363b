"""Swin Transformer backbone trained with Mesa 8-bit activations.

Swin Transformer: Hierarchical Vision Transformer using Shifted Windows
(Liu et al., ICCV 2021, https://arxiv.org/abs/2103.14030), trained with
Mesa: A Memory-saving Training Framework for Transformers
(Pan et al., 2021, https://arxiv.org/abs/2111.11124).

This reuses mmsegmentation 1.2.2's ``SwinTransformer`` unchanged except for the
window attention, whose two matrix products become ``MatMul`` modules so that the
Mesa converter can compress them, and the blocks' activation checkpointing
(``with_cp``), which also offers selective checkpointing. Constructor arguments
and ``state_dict`` keys are those of mmseg's ``SwinTransformer`` (plus Mesa's
quantizer buffers), so any mmseg Swin checkpoint loads unchanged.
"""
from typing import Optional, Union

import torch
from mmseg.models.backbones.swin import SwinBlock, SwinTransformer, WindowMSA
from mmseg.registry import MODELS

from ...mesa import MatMul, MesaPolicy, mesafy_
from ...mesa.shared_ops import probs_matmul
from ..activation_checkpoint import check_with_cp, checkpoint_block
from ..torch_layers import mmcv_to_torch_layers_
from .store_once import store_once_ffns_

__all__ = [
    'MesaWindowMSA', 'CheckpointSwinBlock', 'MesaSwinTransformer',
    'SWIN_MESA_DEFAULTS'
]

# Mesa's Swin recipe: every Linear, LayerNorm, GELU, softmax and attention
# matmul, one group per head, the patch embedding in full precision. Its conv
# input is the image batch, which stays alive for the whole step anyway (an
# 8-bit copy would only add memory); its LayerNorm sees the raw patch features.
SWIN_MESA_DEFAULTS = dict(groups='heads', exclude=(r'patch_embed\..*', ))


class MesaWindowMSA(WindowMSA):
    """mmseg's ``WindowMSA`` with ``q @ k^T`` and ``attn @ v`` as modules.

    Same arguments, parameters, buffers and arithmetic as
    :class:`mmseg.models.backbones.swin.WindowMSA`; ``qk_matmul``, ``softmax``
    and ``av_matmul`` see ``(num_windows * B, num_heads, N, N or D)`` tensors,
    so Mesa quantizes them with one group per head. The relative position bias
    and the shift mask are added exactly as in mmseg. In training under Mesa
    without attention dropout the probabilities are stored once, by
    ``softmax`` (``av_matmul`` reads that copy; see
    :func:`~mesa_seg.mesa.shared_ops.probs_matmul`).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.qk_matmul = MatMul()
        self.av_matmul = MatMul()

    @classmethod
    def from_window_msa(cls, module: WindowMSA) -> 'MesaWindowMSA':
        """Build a ``MesaWindowMSA`` with the options and weights of ``module``.

        The global RNG is left untouched, so a ``MesaSwinTransformer`` gets the
        same initial weights as a ``SwinTransformer`` built under the same seed.
        """
        with torch.random.fork_rng(devices=[]):
            new = cls(
                embed_dims=module.embed_dims,
                num_heads=module.num_heads,
                window_size=module.window_size,
                qkv_bias=module.qkv.bias is not None,
                qk_scale=module.scale,
                attn_drop_rate=module.attn_drop.p,
                proj_drop_rate=module.proj_drop.p,
                init_cfg=module.init_cfg)
        new.load_state_dict(module.state_dict())
        return new.to(module.qkv.weight)

    def forward(self, x: torch.Tensor,
                mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Window attention, as mmseg's ``WindowMSA.forward``.

        Args:
            x (Tensor): Windows of shape (num_windows * B, N, C).
            mask (Tensor | None): Shift mask of shape (num_windows, N, N),
                values in (-inf, 0]. Default: None.

        Returns:
            Tensor: Shape (num_windows * B, N, C).
        """
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads,
                                  C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]

        attn = self.qk_matmul(q * self.scale, k.transpose(-2, -1))
        attn = attn + self._relative_position_bias().unsqueeze(0)
        if mask is not None:
            nW = mask.shape[0]
            attn = attn.view(B // nW, nW, self.num_heads, N,
                             N) + mask.unsqueeze(1).unsqueeze(0)
            attn = attn.view(-1, self.num_heads, N, N)
        x = probs_matmul(attn, v, self.softmax, self.attn_drop, self.av_matmul)
        x = x.transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(x))

    def _relative_position_bias(self) -> torch.Tensor:
        """The (num_heads, Wh*Ww, Wh*Ww) bias gathered from the table."""
        Wh, Ww = self.window_size
        bias = self.relative_position_bias_table[
            self.relative_position_index.view(-1)].view(Wh * Ww, Wh * Ww, -1)
        return bias.permute(2, 0, 1).contiguous()


class CheckpointSwinBlock(SwinBlock):
    """mmseg's ``SwinBlock`` checkpointed through :func:`checkpoint_block`.

    Same modules, ``state_dict`` and arithmetic as
    :class:`mmseg.models.backbones.swin.SwinBlock` (blocks are converted by a
    class swap); ``with_cp`` may also be ``'selective'``. ``with_cp=True`` runs
    torch's non-reentrant checkpoint where mmseg's block calls the reentrant
    one: forward and gradients are the same (both replay the RNG state), and
    under Mesa the recomputation quantizes as the forward did.
    """

    def forward(self, x: torch.Tensor, hw_shape) -> torch.Tensor:
        return checkpoint_block(
            self._forward, x, hw_shape, mode=self.with_cp, state=self)

    def _forward(self, x: torch.Tensor, hw_shape) -> torch.Tensor:
        # mmseg's SwinBlock.forward._inner_forward
        identity = x
        x = self.norm1(x)
        x = self.attn(x, hw_shape)
        x = x + identity

        identity = x
        x = self.norm2(x)
        return self.ffn(x, identity=identity)


@MODELS.register_module()
class MesaSwinTransformer(SwinTransformer):
    """Swin Transformer backbone with Mesa memory-saving activations.

    Takes every argument of :class:`mmseg.models.backbones.SwinTransformer`
    (pretrain_img_size, in_channels, embed_dims, patch_size, window_size,
    mlp_ratio, depths, num_heads, strides, out_indices, qkv_bias, qk_scale,
    patch_norm, drop_rate, attn_drop_rate, drop_path_rate, use_abs_pos_embed,
    act_cfg, norm_cfg, with_cp, pretrained, frozen_stages, init_cfg) with the
    same meaning and defaults, plus ``mesa``; ``with_cp`` also takes
    ``'selective'``. The forward pass is exact; in training, each converted
    layer keeps only an 8-bit copy of its input for backward. With
    ``mesa=None`` this is a drop-in for mmseg's ``SwinTransformer``.

    Every stage, block and window attention exposes ``num_heads``, so with
    ``groups='heads'`` the LayerNorm/Linear/GELU inputs of a block get one
    channel group per head (the stage's patch merging too), and q, k, v, the
    attention scores and the softmax output get one group per head. A tensor
    two layers read is stored once (training, Mesa on): the attention
    probabilities when ``attn_drop_rate == 0``, the MLP's hidden activation
    (GELU's input, :class:`~.store_once.StoreOnceFFN`) when ``drop_rate == 0``.

    Args:
        *args: Positional arguments of ``SwinTransformer``.
        mesa (dict | MesaPolicy | None): Mesa policy. A dict (config style)
            updates :data:`SWIN_MESA_DEFAULTS` (every layer type, one group per
            head, patch embedding in full precision); unknown keys raise.
            A ``MesaPolicy`` is used as given. ``None`` or
            ``dict(enabled=False)`` keeps mmseg's plain FP32 layers.
            Default: ``dict()``.
        **kwargs: Keyword arguments of ``SwinTransformer``. ``with_cp``
            (activation checkpointing of every block whose input requires
            grad) is False (none), True (the block keeps only its input and is
            recomputed in backward, as in mmseg) or ``'selective'`` (matmul
            outputs are kept, everything else is recomputed); outputs and
            gradients are those of False, Mesa or not (the recomputation
            quantizes as the forward did, and Mesa's running ranges advance
            once per step). ``'selective'`` keeps the matmul outputs in full
            precision, which can outweigh Mesa's 8-bit copies: with Mesa, use
            True. Other values raise a ValueError. Default: False.
    """

    def __init__(self,
                 *args,
                 mesa: Union[dict, MesaPolicy, None] = dict(),
                 **kwargs):
        check_with_cp(kwargs.get('with_cp', False))
        super().__init__(*args, **kwargs)
        for stage in self.stages:
            for block in stage.blocks:
                block.with_cp = check_with_cp(block.with_cp)  # also positional
                block.__class__ = CheckpointSwinBlock
                heads = block.attn.w_msa.num_heads
                stage.num_heads = block.num_heads = heads
                block.attn.num_heads = heads
                block.attn.w_msa = MesaWindowMSA.from_window_msa(
                    block.attn.w_msa)
        policy = MesaPolicy.from_arg(mesa, SWIN_MESA_DEFAULTS)
        if policy.enabled:
            mmcv_to_torch_layers_(self)  # mesafy_ converts exact torch types
            mesafy_(self, policy)
            store_once_ffns_(self)

