"""What PVT v1 (``pvt.py``) and PVTv2 (``pvt_v2.py``) share.

Token/feature-map reshapes, the positional-embedding resize, the
spatial-reduction attention, the patch embedding, the pre-norm block and the
stage-independent backbone logic (arch parsing, out_indices, frozen stages,
activation checkpointing, weight init and pretrained loading), plus Mesa's PVT
recipe. Module names and parameter shapes follow the authors' release
(whai362/PVT), so their checkpoints load unchanged.
"""
import logging
import math
import re
import warnings
from typing import Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from mmcv.cnn import build_norm_layer
from mmcv.cnn.bricks.drop import DropPath
from mmengine.logging import print_log
from mmengine.model import BaseModule
from mmengine.model.weight_init import (constant_init, normal_init,
                                        trunc_normal_, trunc_normal_init)
from mmengine.runner.checkpoint import CheckpointLoader
from torch import nn

from ...mesa import MatMul, MesaPolicy, mesafy_
from ...mesa.shared_ops import probs_matmul, shared_input_linears
from ..activation_checkpoint import check_with_cp, checkpoint_block
from ..checkpoint import pvt_classification_to_backbone, unwrap_state_dict

__all__ = [
    'HWShape', 'nlc_to_nchw', 'nchw_to_nlc', 'resize_pos_embed',
    'dropout_or_identity', 'SpatialReductionAttention', 'PVTBlock',
    'PatchEmbed', 'parse_arch', 'PyramidVisionTransformerBase',
    'PVT_MESA_DEFAULTS', 'apply_mesa'
]

HWShape = Tuple[int, int]


def nlc_to_nchw(x: torch.Tensor, hw_shape: HWShape) -> torch.Tensor:
    """(B, H*W, C) tokens -> (B, C, H, W) feature map."""
    B, N, C = x.shape
    return x.transpose(1, 2).reshape(B, C, *hw_shape)


def nchw_to_nlc(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) feature map -> (B, H*W, C) tokens."""
    return x.flatten(2).transpose(1, 2)


def resize_pos_embed(pos_embed: torch.Tensor, src_shape: HWShape,
                     dst_shape: HWShape) -> torch.Tensor:
    """Bilinearly resize a (1, h*w, C) positional embedding to another grid.

    Same interpolation as the authors' PVT code (bilinear, ``align_corners=False``),
    so their reported numbers are reproduced.
    """
    if tuple(src_shape) == tuple(dst_shape):
        return pos_embed
    pos = nlc_to_nchw(pos_embed, src_shape)
    pos = F.interpolate(pos, size=dst_shape, mode='bilinear', align_corners=False)
    return nchw_to_nlc(pos)


def dropout_or_identity(p: float) -> nn.Module:
    """``nn.Dropout(p)``, or ``nn.Identity()`` for ``p == 0``.

    ``nn.Dropout(0.)`` still keeps a mask for backward in training mode.
    """
    return nn.Dropout(p) if p > 0 else nn.Identity()


class SpatialReductionAttention(BaseModule):
    """Multi-head attention whose keys/values come from a downsampled map.

    The token map is reduced by a ``sr_ratio`` x ``sr_ratio`` strided conv and a
    LayerNorm before the key/value projection, so attention costs
    O(N * N / sr_ratio**2). The products and softmax are modules (``MatMul``,
    ``nn.Softmax``) so Mesa can store q, k, v, scores and probabilities in 8 bits,
    one quantization group per head. In training under Mesa, a tensor two
    layers read is stored once: the probabilities (by ``softmax``, when there
    is no attention dropout) and, at ``sr_ratio=1``, the input of ``q`` and
    ``kv`` (by ``q``); see :mod:`mesa_seg.mesa.shared_ops`.

    Args:
        embed_dims (int): Token channels.
        num_heads (int): Attention heads; must divide ``embed_dims``.
        sr_ratio (int): Spatial reduction ratio of keys/values. Default: 1.
        qkv_bias (bool): Bias in the q and kv projections. Default: True.
        attn_drop_rate (float): Dropout on attention probabilities. Default: 0.
        proj_drop_rate (float): Dropout after the output projection. Default: 0.
        init_cfg (dict, optional): Initialization config. Default: None.
    """

    def __init__(self,
                 embed_dims: int,
                 num_heads: int,
                 sr_ratio: int = 1,
                 qkv_bias: bool = True,
                 attn_drop_rate: float = 0.,
                 proj_drop_rate: float = 0.,
                 init_cfg: Optional[dict] = None):
        super().__init__(init_cfg=init_cfg)
        if embed_dims % num_heads:
            raise ValueError(f'embed_dims ({embed_dims}) must be divisible by '
                             f'num_heads ({num_heads})')
        self.embed_dims = embed_dims
        self.num_heads = num_heads
        self.sr_ratio = sr_ratio
        self.scale = (embed_dims // num_heads)**-0.5

        self.q = nn.Linear(embed_dims, embed_dims, bias=qkv_bias)
        self.kv = nn.Linear(embed_dims, embed_dims * 2, bias=qkv_bias)
        self.qk_matmul = MatMul()
        self.softmax = nn.Softmax(dim=-1)
        self.attn_drop = dropout_or_identity(attn_drop_rate)
        self.av_matmul = MatMul()
        self.proj = nn.Linear(embed_dims, embed_dims)
        self.proj_drop = dropout_or_identity(proj_drop_rate)
        self._build_reduction()

    def _build_reduction(self) -> None:
        if self.sr_ratio > 1:
            self.sr = nn.Conv2d(
                self.embed_dims,
                self.embed_dims,
                kernel_size=self.sr_ratio,
                stride=self.sr_ratio)
            # The release uses the default eps here (not the blocks' 1e-6).
            self.norm = nn.LayerNorm(self.embed_dims)

    def reduce(self, x: torch.Tensor, hw_shape: HWShape) -> torch.Tensor:
        """Tokens the keys and values are computed from."""
        if self.sr_ratio > 1:
            x = nchw_to_nlc(self.sr(nlc_to_nchw(x, hw_shape)))
            x = self.norm(x)
        return x

    def forward(self, x: torch.Tensor, hw_shape: HWShape) -> torch.Tensor:
        B, N, C = x.shape
        heads = self.num_heads
        kv_input = self.reduce(x, hw_shape)
        if kv_input is x:  # q and kv read the same tokens
            q, kv = shared_input_linears(x, (self.q, self.kv))
        else:
            q, kv = self.q(x), self.kv(kv_input)
        q = q.reshape(B, N, heads, C // heads).transpose(1, 2)
        k, v = kv.reshape(B, -1, 2, heads, C // heads).permute(2, 0, 3, 1, 4)

        attn = self.qk_matmul(q, k.transpose(-2, -1)) * self.scale
        x = probs_matmul(attn, v, self.softmax, self.attn_drop, self.av_matmul)
        x = x.transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(x))


class PatchEmbed(BaseModule):
    """Patch embedding: conv (optionally overlapping) -> flatten -> LayerNorm.

    Args:
        in_channels (int): Input channels.
        embed_dims (int): Output channels.
        kernel_size (int): Conv kernel size.
        stride (int): Conv stride. Default: None (= kernel_size, no overlap).
        padding (int): Conv padding. Default: 0.
        init_cfg (dict, optional): Initialization config. Default: None.
    """

    def __init__(self,
                 in_channels: int,
                 embed_dims: int,
                 kernel_size: int,
                 stride: Optional[int] = None,
                 padding: int = 0,
                 init_cfg: Optional[dict] = None):
        super().__init__(init_cfg=init_cfg)
        self.proj = nn.Conv2d(
            in_channels,
            embed_dims,
            kernel_size=kernel_size,
            stride=stride or kernel_size,
            padding=padding)
        self.norm = nn.LayerNorm(embed_dims)  # default eps, as released

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, HWShape]:
        x = self.proj(x)
        hw_shape = tuple(x.shape[2:])
        return self.norm(nchw_to_nlc(x)), hw_shape


class PVTBlock(BaseModule):
    """Pre-norm transformer block: ``x + attn(norm1(x))``, ``x + mlp(norm2(x))``.

    Takes its attention and MLP ready-built, so PVT v1 and v2 share it. Exposes
    ``num_heads`` (the attention's) so Mesa gives the block's LayerNorms and MLP
    one channel group per head.

    Args:
        embed_dims (int): Token channels.
        attn (nn.Module): Attention taking ``(x, hw_shape)``, with ``num_heads``.
        mlp (nn.Module): MLP taking ``(x, hw_shape)``.
        drop_path_rate (float): Stochastic depth rate. Default: 0.
        norm_cfg (dict): Config of norm1/norm2. Default: dict(type='LN', eps=1e-6).
        with_cp (bool | str): Activation checkpointing of the block when its
            input requires grad: False (none), True (recompute the whole block
            in backward) or ``'selective'`` (keep matmul/conv outputs,
            recompute the rest); see
            :func:`~mesa_seg.models.activation_checkpoint.checkpoint_block`.
            Default: False.
        init_cfg (dict, optional): Initialization config. Default: None.
    """

    def __init__(self,
                 embed_dims: int,
                 attn: nn.Module,
                 mlp: nn.Module,
                 drop_path_rate: float = 0.,
                 norm_cfg: dict = dict(type='LN', eps=1e-6),
                 with_cp: Union[bool, str] = False,
                 init_cfg: Optional[dict] = None):
        super().__init__(init_cfg=init_cfg)
        self.with_cp = check_with_cp(with_cp)
        self.num_heads = attn.num_heads
        self.norm1 = build_norm_layer(norm_cfg, embed_dims)[1]
        self.attn = attn
        self.drop_path = (
            DropPath(drop_path_rate) if drop_path_rate > 0 else nn.Identity())
        self.norm2 = build_norm_layer(norm_cfg, embed_dims)[1]
        self.mlp = mlp

    def forward(self, x: torch.Tensor, hw_shape: HWShape) -> torch.Tensor:
        return checkpoint_block(
            self._forward, x, hw_shape, mode=self.with_cp, state=self)

    def _forward(self, x: torch.Tensor, hw_shape: HWShape) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), hw_shape))
        return x + self.drop_path(self.mlp(self.norm2(x), hw_shape))


def parse_arch(arch: Union[str, dict], arch_zoo: Dict[str, dict],
               required: Sequence[str]) -> dict:
    """A copy of ``arch_zoo[arch]``, or ``arch`` itself checked.

    Args:
        arch (str | dict): A name of ``arch_zoo`` or a dict of per-stage lists.
        arch_zoo (dict): The named architectures.
        required (Sequence[str]): Keys a dict must have, each a list with one
            entry per stage.

    Returns:
        dict: The architecture (a new dict).

    Raises:
        ValueError: unknown name, missing keys or lists of unequal length.
        TypeError: ``arch`` is neither a str nor a dict.
    """
    if isinstance(arch, str):
        if arch not in arch_zoo:
            raise ValueError(f'Unknown arch {arch!r}; choose one of '
                             f'{sorted(arch_zoo)} or pass a dict')
        return dict(arch_zoo[arch])
    if not isinstance(arch, dict):
        raise TypeError(f'arch must be a str or dict, got {type(arch)}')
    missing = set(required) - set(arch)
    if missing:
        raise ValueError(f'arch dict misses {sorted(missing)}')
    lengths = {k: len(arch[k]) for k in required}
    if len(set(lengths.values())) != 1:
        raise ValueError(f'arch lists must have one entry per stage: {lengths}')
    return dict(arch)


class PyramidVisionTransformerBase(BaseModule):
    """What PVT v1 and v2 share: stage bookkeeping, freezing, weight loading.

    Subclasses build, for every stage ``i`` (1-based), modules named
    ``patch_embed{i}`` and ``block{i}`` (and optionally ``pos_embed{i}``,
    ``norm{i}``), give their blocks ``with_cp=self.with_cp`` and implement
    ``forward``.

    Args:
        num_stages (int): Number of stages.
        out_indices (Sequence[int] | int): Stages (0-based) whose features
            are returned.
        frozen_stages (int): Stages ``0..frozen_stages`` get no gradient and stay
            in eval mode; -1 freezes nothing.
        pretrained (str, optional): Deprecated, use ``init_cfg``.
        init_cfg (dict, optional): ``dict(type='Pretrained', checkpoint=PATH)``
            loads official (and, for v2, timm) ImageNet weights from a local
            file; None initialises from scratch.
        with_cp (bool | str): Activation checkpointing of every block: False,
            True or ``'selective'`` (see :class:`PVTBlock`). Default: False.
    """

    def __init__(self,
                 num_stages: int,
                 out_indices: Union[int, Sequence[int]],
                 frozen_stages: int,
                 pretrained: Optional[str] = None,
                 init_cfg: Optional[dict] = None,
                 with_cp: Union[bool, str] = False):
        with_cp = check_with_cp(with_cp)
        if pretrained is not None:
            if init_cfg is not None:
                raise ValueError('init_cfg and pretrained cannot both be set')
            if not isinstance(pretrained, str):
                raise TypeError('pretrained must be a str or None')
            warnings.warn('DeprecationWarning: pretrained is deprecated, '
                          'please use "init_cfg" instead')
            init_cfg = dict(type='Pretrained', checkpoint=pretrained)
        super().__init__(init_cfg=init_cfg)
        if isinstance(out_indices, int):
            out_indices = (out_indices, )
        out_indices = tuple(i + num_stages if i < 0 else i for i in out_indices)
        if not out_indices or not all(0 <= i < num_stages for i in out_indices):
            raise ValueError(f'out_indices must lie in [0, {num_stages}), '
                             f'got {out_indices}')
        if not -1 <= frozen_stages < num_stages:
            raise ValueError(f'frozen_stages must lie in [-1, {num_stages}), '
                             f'got {frozen_stages}')
        self.num_stages = num_stages
        self.out_indices = out_indices
        self.frozen_stages = frozen_stages
        self.with_cp = with_cp

    def _stage_prefixes(self, stage: int) -> Tuple[str, ...]:
        i = stage + 1
        return (f'patch_embed{i}', f'pos_embed{i}', f'pos_drop{i}', f'block{i}',
                f'norm{i}')

    def _freeze_stages(self) -> None:
        for stage in range(self.frozen_stages + 1):
            prefixes = self._stage_prefixes(stage)
            for name, module in self.named_children():
                if name in prefixes:
                    module.eval()
            for name, param in self.named_parameters():
                if name.split('.')[0] in prefixes:
                    param.requires_grad = False

    def train(self, mode: bool = True):
        """Set train mode, keeping the frozen stages in eval mode."""
        super().train(mode)
        self._freeze_stages()
        return self

    def init_weights(self) -> None:
        if self.init_cfg is None:
            print_log(f'No pre-trained weights for {type(self).__name__}, '
                      'training starts from scratch', logger='current')
            self._init_from_scratch()
        elif (isinstance(self.init_cfg, dict)
              and self.init_cfg.get('type') == 'Pretrained'):
            self._load_pretrained(self.init_cfg['checkpoint'])
        else:
            super().init_weights()
        self._freeze_stages()

    def _init_from_scratch(self) -> None:
        # The release's initialisation (whai362/PVT classification code).
        for name, param in self.named_parameters():
            if re.fullmatch(r'pos_embed\d+', name):
                trunc_normal_(param, std=.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_init(m, std=.02, bias=0.)
            elif isinstance(m, nn.LayerNorm):
                constant_init(m, val=1.0, bias=0.)
            elif isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                fan_out //= m.groups
                normal_init(m, mean=0., std=math.sqrt(2.0 / fan_out), bias=0.)

    def _convert_pretrained(self, state_dict: dict) -> dict:
        """Hook for family-specific key/shape conversion of loaded weights."""
        return state_dict

    def _load_pretrained(self, checkpoint: str) -> None:
        ckpt = CheckpointLoader.load_checkpoint(
            checkpoint, map_location='cpu', logger='current')
        state_dict, dropped = pvt_classification_to_backbone(
            unwrap_state_dict(ckpt))
        if dropped:
            print_log(
                f'{type(self).__name__}: ignored classification-only weights '
                f'of {checkpoint}: {", ".join(dropped)}',
                logger='current')
        state_dict = self._convert_pretrained(state_dict)
        result = self.load_state_dict(state_dict, strict=False)
        # Buffers absent from a checkpoint (e.g. Mesa's running ranges, which
        # initialise on the first batch) are expected; parameters are not.
        params = dict(self.named_parameters())
        missing = [k for k in result.missing_keys if k in params]
        if missing:
            print_log(
                f'{type(self).__name__}: parameters missing in {checkpoint} '
                f'(left at their initial values): {", ".join(missing)}',
                logger='current',
                level=logging.WARNING)
        if result.unexpected_keys:
            print_log(
                f'{type(self).__name__}: unexpected keys in {checkpoint} '
                f'(ignored): {", ".join(result.unexpected_keys)}',
                logger='current',
                level=logging.WARNING)
        print_log(f'{type(self).__name__}: loaded {checkpoint}', logger='current')


# Mesa's recipe for PVT: every Linear, Conv2d, LayerNorm, GELU, softmax and
# attention matmul, one group per head, except the first patch embedding: its
# conv input is the image batch, alive for the whole step anyway (an 8-bit copy
# would only add memory), and its LayerNorm sees the raw patch features (the
# Mesa reference keeps the first LayerNorm in full precision too).
PVT_MESA_DEFAULTS = dict(groups='heads', exclude=(r'^patch_embed1\.', ))


def apply_mesa(model: nn.Module, mesa: Union[dict, MesaPolicy, None]) -> None:
    """Convert ``model``'s layers in place under a Mesa policy.

    Args:
        model (nn.Module): A PVT / PVTv2 backbone.
        mesa (dict | MesaPolicy | None): A dict (config style) updates
            :data:`PVT_MESA_DEFAULTS`; a ``MesaPolicy`` is used as given; None
            (like ``enabled=False``) leaves the model FP32.
    """
    mesafy_(model, MesaPolicy.from_arg(mesa, PVT_MESA_DEFAULTS))
