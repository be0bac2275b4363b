"""Pyramid Vision Transformer (PVT v1) backbone, FP32 and Mesa.

Paper: `Pyramid Vision Transformer: A Versatile Backbone for Dense Prediction
without Convolutions <https://arxiv.org/abs/2102.12122>`_ (Wang et al., ICCV 2021).

Module names and parameter shapes follow the authors' release (whai362/PVT), so
their ImageNet checkpoints (``pvt_tiny.pth`` ...) load through
``init_cfg=dict(type='Pretrained', checkpoint=LOCAL_PATH)`` without conversion.
Like the authors' detection/segmentation code, the stages output un-normalised
features and the 224x224 positional embeddings are resized to every input.
What v1 shares with PVTv2 (attention, block, backbone base) is in
``pvt_base.py``.
"""
import math
from typing import List, Optional, Sequence, Union

import torch
from mmcv.cnn import build_activation_layer
from mmengine.model import BaseModule, ModuleList
from mmseg.registry import MODELS
from torch import nn

from ...mesa import MesaPolicy
from ...mesa.shared_ops import gelu_project
from .pvt_base import (HWShape, PatchEmbed, PVTBlock,
                       PyramidVisionTransformerBase, SpatialReductionAttention,
                       apply_mesa, dropout_or_identity, nlc_to_nchw, parse_arch,
                       resize_pos_embed)

__all__ = ['PVTMlp', 'PVT', 'MesaPVT']


class PVTMlp(BaseModule):
    """Two-layer MLP of a PVT v1 block: fc1 -> act -> fc2.

    In training under Mesa with a GELU and no dropout, the hidden activation
    is stored once, as GELU's input (see
    :func:`~mesa_seg.mesa.shared_ops.gelu_project`).

    Args:
        in_features (int): Input (and output) channels.
        hidden_features (int): Hidden channels.
        act_cfg (dict): Activation config. Default: dict(type='GELU').
        drop_rate (float): Dropout after each layer. Default: 0.
        init_cfg (dict, optional): Initialization config. Default: None.
    """

    def __init__(self,
                 in_features: int,
                 hidden_features: int,
                 act_cfg: dict = dict(type='GELU'),
                 drop_rate: float = 0.,
                 init_cfg: Optional[dict] = None):
        super().__init__(init_cfg=init_cfg)
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = build_activation_layer(act_cfg)
        self.fc2 = nn.Linear(hidden_features, in_features)
        self.drop = dropout_or_identity(drop_rate)

    def forward(self, x: torch.Tensor, hw_shape: HWShape) -> torch.Tensor:
        # drop(fc2(drop(act(fc1(x))))); under Mesa fc2 reads GELU's stored input.
        return self.drop(gelu_project(self.fc1(x), self.act, self.drop, self.fc2))


@MODELS.register_module()
class PVT(PyramidVisionTransformerBase):
    """Pyramid Vision Transformer (v1) backbone.

    Each stage: non-overlapping patch embedding (stride 4, then 2), plus a
    learned positional embedding stored for a ``pretrain_img_size`` input and
    bilinearly resized to the actual grid, then transformer blocks with
    spatial-reduction attention. Returns the NCHW output of the stages listed
    in ``out_indices`` (strides 4, 8, 16, 32), without a final norm (as the
    authors' detection/segmentation code).

    Args:
        arch (str | dict): ``'tiny'``, ``'small'``, ``'medium'``, ``'large'``, or
            a dict with per-stage lists ``embed_dims``, ``depths``,
            ``num_heads``, ``mlp_ratios``, ``sr_ratios``. Default: 'tiny'.
        in_channels (int): Input image channels. Default: 3.
        pretrain_img_size (int): Input size the positional embeddings are stored
            for (224 for the ImageNet checkpoints). Default: 224.
        patch_size (int): Stride of the first patch embedding. Default: 4.
        qkv_bias (bool): Bias in the q/kv projections. Default: True.
        drop_rate (float): Dropout rate (positional embedding, projections,
            MLP). Default: 0.
        attn_drop_rate (float): Attention dropout rate. Default: 0.
        drop_path_rate (float): Stochastic depth rate, increased linearly over
            the blocks up to this value. Default: 0.1.
        out_indices (Sequence[int] | int): Output stages. Default: (0, 1, 2, 3).
        frozen_stages (int): Stages to freeze, -1 for none. Default: -1.
        act_cfg (dict): MLP activation. Default: dict(type='GELU').
        norm_cfg (dict): Norm of the blocks. Default: dict(type='LN', eps=1e-6).
        pretrained (str, optional): Deprecated, use ``init_cfg``. Default: None.
        init_cfg (dict, optional): ``dict(type='Pretrained', checkpoint=PATH)``
            with a local official checkpoint, or None. Default: None.
        with_cp (bool | str): Activation checkpointing of every transformer
            block whose input requires grad: False (none); True (the block
            keeps only its input and is recomputed in backward, as ``with_cp``
            of mmseg's Swin and MiT); ``'selective'`` (matmul and conv outputs
            are kept, everything else is recomputed). Outputs and gradients
            are those of False. Default: False.
    """
    arch_zoo = {
        name: dict(
            embed_dims=[64, 128, 320, 512],
            depths=depths,
            num_heads=[1, 2, 5, 8],
            mlp_ratios=[8, 8, 4, 4],
            sr_ratios=[8, 4, 2, 1])
        for name, depths in (('tiny', [2, 2, 2, 2]), ('small', [3, 4, 6, 3]),
                             ('medium', [3, 4, 18, 3]), ('large', [3, 8, 27, 3]))
    }
    _arch_keys = ('embed_dims', 'depths', 'num_heads', 'mlp_ratios', 'sr_ratios')

    def __init__(self,
                 arch: Union[str, dict] = 'tiny',
                 in_channels: int = 3,
                 pretrain_img_size: int = 224,
                 patch_size: int = 4,
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
        self.pretrain_img_size = pretrain_img_size

        dpr = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        cur, channels, stride = 0, in_channels, patch_size
        self.pos_grids: List[HWShape] = []
        for i, depth in enumerate(depths):
            dims = self.embed_dims[i]
            step = patch_size if i == 0 else 2
            grid = pretrain_img_size // stride
            self.pos_grids.append((grid, grid))
            setattr(self, f'patch_embed{i + 1}',
                    PatchEmbed(channels, dims, kernel_size=step))
            setattr(self, f'pos_embed{i + 1}',
                    nn.Parameter(torch.zeros(1, grid * grid, dims)))
            setattr(self, f'pos_drop{i + 1}', dropout_or_identity(drop_rate))
            setattr(self, f'block{i + 1}', ModuleList([
                PVTBlock(
                    dims,
                    SpatialReductionAttention(
                        dims,
                        self.arch['num_heads'][i],
                        sr_ratio=self.arch['sr_ratios'][i],
                        qkv_bias=qkv_bias,
                        attn_drop_rate=attn_drop_rate,
                        proj_drop_rate=drop_rate),
                    PVTMlp(
                        dims,
                        int(dims * self.arch['mlp_ratios'][i]),
                        act_cfg=act_cfg,
                        drop_rate=drop_rate),
                    drop_path_rate=dpr[cur + j],
                    norm_cfg=norm_cfg,
                    with_cp=self.with_cp) for j in range(depth)
            ]))
            cur += depth
            channels = dims
            stride *= 2

    def _convert_pretrained(self, state_dict: dict) -> dict:
        # Checkpoints stored for another input size: resize to this model's grid.
        for i, grid in enumerate(self.pos_grids):
            key = f'pos_embed{i + 1}'
            if key in state_dict:
                side = math.isqrt(state_dict[key].shape[1])
                state_dict[key] = resize_pos_embed(state_dict[key], (side, side),
                                                   grid)
        return state_dict

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        outs = []
        for i in range(self.num_stages):
            x, hw_shape = getattr(self, f'patch_embed{i + 1}')(x)
            pos_embed = resize_pos_embed(
                getattr(self, f'pos_embed{i + 1}'), self.pos_grids[i], hw_shape)
            x = getattr(self, f'pos_drop{i + 1}')(x + pos_embed)
            for block in getattr(self, f'block{i + 1}'):
                x = block(x, hw_shape)
            x = nlc_to_nchw(x, hw_shape)
            if i in self.out_indices:
                outs.append(x)
        return outs


@MODELS.register_module()
class MesaPVT(PVT):
    """PVT v1 trained with Mesa: activations saved for backward in 8 bits.

    Same arguments and ``state_dict`` keys as :class:`PVT` (plus the quantizers'
    running-range buffers), and the same forward output.

    Args:
        mesa (dict | MesaPolicy | None): Mesa policy. A dict (config style)
            updates :data:`~mesa_seg.models.backbones.pvt_base.PVT_MESA_DEFAULTS`
            (all layer types, one group per head, first patch embedding in
            FP32); unknown keys raise. None or ``dict(enabled=False)`` builds a
            plain FP32 model. Default: dict().
        **kwargs: Arguments of :class:`PVT`. With ``with_cp``, Mesa's running
            ranges and rounding steps advance once per step, as without
            checkpointing, and the recomputation quantizes exactly as the
            forward did, so the gradients are those of ``with_cp=False``.
            ``'selective'`` keeps the matmul/conv outputs in full precision,
            which can outweigh Mesa's 8-bit copies: with Mesa, use True.
    """

    def __init__(self, mesa: Union[dict, MesaPolicy, None] = dict(), **kwargs):
        super().__init__(**kwargs)
        apply_mesa(self, mesa)
