"""PVTv2 backbone, FP32 and Mesa.

Paper: `PVT v2: Improved Baselines with Pyramid Vision Transformer
<https://arxiv.org/abs/2106.13797>`_ (Wang et al., CVMJ 2022).

Differences from v1 (``pvt.py``; the attention, block and backbone base both
use are in ``pvt_base.py``): overlapping patch embeddings (7x7/4, then 3x3/2)
instead of positional embeddings, a 3x3 depth-wise conv inside the MLP, a
LayerNorm after every stage, and optionally linear spatial-reduction attention
(``'b2_li'``: keys/values from a 7x7 average-pooled map). Module names follow the authors' release
(whai362/PVT), so ``pvt_v2_b*.pth`` load unchanged; timm-layout weights are
converted on load (``mesa_seg.models.checkpoint.timm_pvt_v2_to_official``).
"""
from typing import List, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from mmcv.cnn import build_activation_layer, build_norm_layer
from mmengine.logging import print_log
from mmengine.model import BaseModule, ModuleList
from mmseg.registry import MODELS
from torch import nn

from ...mesa import MesaPolicy
from ...mesa.shared_ops import gelu_project
from ..checkpoint import is_timm_pvt_v2, timm_pvt_v2_to_official
from .pvt_base import (HWShape, PatchEmbed, PVTBlock,
                       PyramidVisionTransformerBase, SpatialReductionAttention,
                       apply_mesa, dropout_or_identity, nchw_to_nlc,
                       nlc_to_nchw, parse_arch)

__all__ = [
    'AdaptiveAvgPool2d', 'LinearSRAttention', 'DWConv', 'PVTv2Mlp', 'PVTv2',
    'MesaPVTv2'
]


class _AdaptiveAvgPool2dFn(torch.autograd.Function):
    """``F.adaptive_avg_pool2d`` keeping only the input's shape for backward.

    Pooling is linear, so its gradient does not depend on the input values;
    torch's op nevertheless saves the whole input, i.e. a full-precision copy
    of every block's attention input in the linear variant.
    """

    @staticmethod
    def forward(ctx, x, output_size):
        ctx.input_shape = x.shape
        return F.adaptive_avg_pool2d(x, output_size)

    @staticmethod
    def backward(ctx, grad):
        # Only the shape of the second argument is read: pass a free expand.
        shape_only = grad.new_zeros(()).expand(ctx.input_shape)
        return torch.ops.aten._adaptive_avg_pool2d_backward(
            grad.contiguous(), shape_only), None


class AdaptiveAvgPool2d(nn.AdaptiveAvgPool2d):
    """``nn.AdaptiveAvgPool2d`` that saves nothing but a shape for backward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            return _AdaptiveAvgPool2dFn.apply(x, self.output_size)
        return super().forward(x)


class LinearSRAttention(SpatialReductionAttention):
    """Spatial-reduction attention with keys/values from a fixed 7x7 pooled map.

    PVTv2's linear-complexity variant: average pool to ``pool_size`` ->
    1x1 conv -> LayerNorm -> GELU, then the key/value projection.

    Args:
        embed_dims (int): Token channels.
        num_heads (int): Attention heads.
        pool_size (int): Side of the pooled key/value map. Default: 7.
        **kwargs: Other arguments of :class:`SpatialReductionAttention`
            (``sr_ratio`` is ignored).
    """

    def __init__(self, embed_dims: int, num_heads: int, pool_size: int = 7,
                 **kwargs):
        self.pool_size = pool_size
        super().__init__(embed_dims, num_heads, **kwargs)

    def _build_reduction(self) -> None:
        self.pool = AdaptiveAvgPool2d(self.pool_size)
        self.sr = nn.Conv2d(self.embed_dims, self.embed_dims, kernel_size=1)
        self.norm = nn.LayerNorm(self.embed_dims)
        self.act = nn.GELU()

    def reduce(self, x: torch.Tensor, hw_shape: HWShape) -> torch.Tensor:
        x = self.sr(self.pool(nlc_to_nchw(x, hw_shape)))
        return self.act(self.norm(nchw_to_nlc(x)))


class DWConv(nn.Module):
    """3x3 depth-wise conv on tokens (own module only for the release's
    ``mlp.dwconv.dwconv`` key)."""

    def __init__(self, channels: int):
        super().__init__()
        self.dwconv = nn.Conv2d(
            channels, channels, 3, padding=1, groups=channels)

    def forward(self, x: torch.Tensor, hw_shape: HWShape) -> torch.Tensor:
        return nchw_to_nlc(self.dwconv(nlc_to_nchw(x, hw_shape)))


class PVTv2Mlp(BaseModule):
    """MLP of a PVTv2 block: fc1 -> [ReLU] -> 3x3 depth-wise conv -> act -> fc2.

    In training under Mesa with a GELU and no dropout, the hidden activation
    is stored once, as GELU's input (see
    :func:`~mesa_seg.mesa.shared_ops.gelu_project`).

    Args:
        in_features (int): Input (and output) channels.
        hidden_features (int): Hidden channels.
        act_cfg (dict): Activation config. Default: dict(type='GELU').
        drop_rate (float): Dropout after the activation and fc2. Default: 0.
        linear (bool): Add the ReLU after fc1 (the linear variant). Default: False.
        init_cfg (dict, optional): Initialization config. Default: None.
    """

    def __init__(self,
                 in_features: int,
                 hidden_features: int,
                 act_cfg: dict = dict(type='GELU'),
                 drop_rate: float = 0.,
                 linear: bool = False,
                 init_cfg: Optional[dict] = None):
        super().__init__(init_cfg=init_cfg)
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.relu = nn.ReLU() if linear else nn.Identity()
        self.dwconv = DWConv(hidden_features)
        self.act = build_activation_layer(act_cfg)
        self.fc2 = nn.Linear(hidden_features, in_features)
        self.drop = dropout_or_identity(drop_rate)

    def forward(self, x: torch.Tensor, hw_shape: HWShape) -> torch.Tensor:
        x = self.dwconv(self.relu(self.fc1(x)), hw_shape)
        # drop(fc2(drop(act(x)))); under Mesa fc2 reads GELU's stored input.
        return self.drop(gelu_project(x, self.act, self.drop, self.fc2))


@MODELS.register_module()
class PVTv2(PyramidVisionTransformerBase):
    """PVTv2 backbone.

    Each stage: overlapping patch embedding (7x7 stride 4, then 3x3 stride 2),
    transformer blocks with spatial-reduction attention and a depth-wise conv
    MLP, then a LayerNorm. Returns the NCHW output of the stages listed in
    ``out_indices`` (strides 4, 8, 16, 32). Any input size works (no
    positional embedding).

    Args:
        arch (str | dict): ``'b0'`` .. ``'b5'``, ``'b2_li'``, or a dict with
            per-stage lists ``embed_dims``, ``depths``, ``num_heads``,
            ``mlp_ratios``, ``sr_ratios`` (and optionally ``linear``).
            Default: 'b0'.
        in_channels (int): Input image channels. Default: 3.
        qkv_bias (bool): Bias in the q/kv projections. Default: True.
        drop_rate (float): Dropout rate (projections, MLP). Default: 0.
        attn_drop_rate (float): Attention dropout rate. Default: 0.
        drop_path_rate (float): Stochastic depth rate, increased linearly over
            the blocks up to this value. Default: 0.1.
        out_indices (Sequence[int] | int): Output stages. Default: (0, 1, 2, 3).
        frozen_stages (int): Stages to freeze, -1 for none. Default: -1.
        act_cfg (dict): MLP activation. Default: dict(type='GELU').
        norm_cfg (dict): Norm of the blocks and stage outputs.
            Default: dict(type='LN', eps=1e-6).
        pretrained (str, optional): Deprecated, use ``init_cfg``. Default: None.
        init_cfg (dict, optional): ``dict(type='Pretrained', checkpoint=PATH)``
            with a local official or timm checkpoint, or None. Default: None.
        with_cp (bool | str): Activation checkpointing of every transformer
            block whose input requires grad: False (none); True (the block
            keeps only its input and is recomputed in backward, as ``with_cp``
            of mmseg's Swin and MiT); ``'selective'`` (matmul and conv outputs
            are kept, everything else is recomputed). Outputs and gradients
            are those of False. Default: False.
    """
    _common = dict(num_heads=[1, 2, 5, 8], sr_ratios=[8, 4, 2, 1])
    arch_zoo = {
        'b0': dict(embed_dims=[32, 64, 160, 256], depths=[2, 2, 2, 2],
                   mlp_ratios=[8, 8, 4, 4], **_common),
        'b1': dict(embed_dims=[64, 128, 320, 512], depths=[2, 2, 2, 2],
                   mlp_ratios=[8, 8, 4, 4], **_common),
        'b2': dict(embed_dims=[64, 128, 320, 512], depths=[3, 4, 6, 3],
                   mlp_ratios=[8, 8, 4, 4], **_common),
        'b2_li': dict(embed_dims=[64, 128, 320, 512], depths=[3, 4, 6, 3],
                      mlp_ratios=[8, 8, 4, 4], linear=True, **_common),
        'b3': dict(embed_dims=[64, 128, 320, 512], depths=[3, 4, 18, 3],
                   mlp_ratios=[8, 8, 4, 4], **_common),
        'b4': dict(embed_dims=[64, 128, 320, 512], depths=[3, 8, 27, 3],
                   mlp_ratios=[8, 8, 4, 4], **_common),
        'b5': dict(embed_dims=[64, 128, 320, 512], depths=[3, 6, 40, 3],
                   mlp_ratios=[4, 4, 4, 4], **_common),
    }
    del _common
    _arch_keys = ('embed_dims', 'depths', 'num_heads', 'mlp_ratios', 'sr_ratios')

    def __init__(self,
                 arch: Union[str, dict] = 'b0',
                 in_channels: int = 3,
                 qkv_bias: bool = True,
                 drop_rate: float = 0.,
                 attn_drop_rate: float = 0.,
                 drop_path_rate: float = 0.1,
                 out_indices: Union[int, Sequence[int]] = (0, 1, 2, 3),
                 frozen_stages: int = -1,
                 act_cfg: dict = dict(type='GELU'),
                 norm_cfg: dict = dict(type='LN', eps=1e-6),
                 pretrained: Optional[str] = None,
                 init_cfg: Optional[dict] = None,
                 with_cp: Union[bool, str] = False):
        self.arch = parse_arch(arch, self.arch_zoo, self._arch_keys)
        depths = self.arch['depths']
        super().__init__(len(depths), out_indices, frozen_stages, pretrained,
                         init_cfg, with_cp)
        self.embed_dims = self.arch['embed_dims']
        self.linear = bool(self.arch.get('linear', False))

        dpr = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        cur, channels = 0, in_channels
        for i, depth in enumerate(depths):
            dims = self.embed_dims[i]
            kernel, stride = (7, 4) if i == 0 else (3, 2)
            setattr(self, f'patch_embed{i + 1}',
                    PatchEmbed(channels, dims, kernel, stride, kernel // 2))
            blocks = ModuleList()
            for j in range(depth):
                attn_cls = (
                    LinearSRAttention if self.linear else SpatialReductionAttention)
                attn = attn_cls(
                    dims,
                    self.arch['num_heads'][i],
                    sr_ratio=self.arch['sr_ratios'][i],
                    qkv_bias=qkv_bias,
                    attn_drop_rate=attn_drop_rate,
                    proj_drop_rate=drop_rate)
                mlp = PVTv2Mlp(
                    dims,
                    int(dims * self.arch['mlp_ratios'][i]),
                    act_cfg=act_cfg,
                    drop_rate=drop_rate,
                    linear=self.linear)
                blocks.append(
                    PVTBlock(
                        dims,
                        attn,
                        mlp,
                        dpr[cur + j],
                        norm_cfg=norm_cfg,
                        with_cp=self.with_cp))
            setattr(self, f'block{i + 1}', blocks)
            setattr(self, f'norm{i + 1}', build_norm_layer(norm_cfg, dims)[1])
            cur += depth
            channels = dims

    def _convert_pretrained(self, state_dict: dict) -> dict:
        if is_timm_pvt_v2(state_dict):
            print_log(f'{type(self).__name__}: converting timm-layout weights '
                      'to the official layout', logger='current')
            state_dict = timm_pvt_v2_to_official(state_dict)
        return state_dict

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        outs = []
        for i in range(self.num_stages):
            x, hw_shape = getattr(self, f'patch_embed{i + 1}')(x)
            for block in getattr(self, f'block{i + 1}'):
                x = block(x, hw_shape)
            x = nlc_to_nchw(getattr(self, f'norm{i + 1}')(x), hw_shape)
            if i in self.out_indices:
                outs.append(x)
        return outs


@MODELS.register_module()
class MesaPVTv2(PVTv2):
    """PVTv2 trained with Mesa: activations saved for backward in 8 bits.

    Same arguments and ``state_dict`` keys as :class:`PVTv2` (plus the
    quantizers' running-range buffers), and the same forward output.

    Args:
        mesa (dict | MesaPolicy | None): Mesa policy, as for
            :class:`~mesa_seg.models.backbones.pvt.MesaPVT` (defaults
            :data:`~mesa_seg.models.backbones.pvt_base.PVT_MESA_DEFAULTS`).
            None or ``dict(enabled=False)`` builds a plain FP32 model.
            Default: dict().
        **kwargs: Arguments of :class:`PVTv2`; ``with_cp`` combines with Mesa
            as for :class:`~mesa_seg.models.backbones.pvt.MesaPVT`.
    """

    def __init__(self, mesa: Union[dict, MesaPolicy, None] = dict(), **kwargs):
        super().__init__(**kwargs)
        apply_mesa(self, mesa)
