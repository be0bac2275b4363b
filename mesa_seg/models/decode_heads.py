"""mmseg's ``UPerHead`` and ``SegformerHead`` storing the input of their
fusing convolution at the resolutions it is made of.

UPerHead's bottleneck convolution reads the concatenation of four maps at ¼
resolution, three of them bilinear upsamplings of ⅛, 1/16 and 1/32-resolution
maps. Under Mesa the convolution keeps an 8-bit copy of the whole
concatenation: for UperNet-Swin-T at 512x512, batch 2, 64 MiB, three quarters
of it upsampled pixels. :class:`StoreOnceUPerHead` keeps the four maps at their
own resolution (21 MiB there) and upsamples them again in backward
(:func:`~mesa_seg.mesa.shared_ops.resized_cat_conv`). SegFormer's all-MLP head
does the same with its four 256-channel maps before ``fusion_conv``
(:class:`StoreOnceSegformerHead`; MiT-B0 at 512x512, batch 2: 32 MiB of codes
become 11). Class swaps (:func:`store_once_heads_`): same modules,
``state_dict`` and forward output.
"""
import torch
from mmseg.models.decode_heads import SegformerHead, UPerHead
from mmseg.models.utils import resize
from torch import nn

from ..mesa.shared_ops import resized_cat_conv
from .torch_layers import swap_classes_

__all__ = ['StoreOnceUPerHead', 'StoreOnceSegformerHead', 'store_once_heads_']


class StoreOnceUPerHead(UPerHead):
    """mmseg's ``UPerHead`` whose bottleneck convolution stores its input maps
    at their own resolution (training, Mesa on the convolution); otherwise
    exactly mmseg's forward."""

    def _forward_feature(self, inputs):
        # mmseg 1.2.2's UPerHead._forward_feature up to the concatenation.
        inputs = self._transform_inputs(inputs)
        laterals = [conv(inputs[i]) for i, conv in enumerate(self.lateral_convs)]
        laterals.append(self.psp_forward(inputs))
        levels = len(laterals)
        for i in range(levels - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + resize(
                laterals[i], size=laterals[i - 1].shape[2:], mode='bilinear',
                align_corners=self.align_corners)
        fpn_outs = [self.fpn_convs[i](laterals[i]) for i in range(levels - 1)]
        fpn_outs.append(laterals[-1])
        bottleneck = self.fpn_bottleneck
        if not (self.training and _plain_conv_module(bottleneck)):
            fpn_outs[1:] = [resize(out, size=fpn_outs[0].shape[2:], mode='bilinear',
                                   align_corners=self.align_corners) for out in fpn_outs[1:]]
            return bottleneck(torch.cat(fpn_outs, dim=1))
        return _conv_module_of_resized_cat(bottleneck, fpn_outs, self.align_corners)


class StoreOnceSegformerHead(SegformerHead):
    """mmseg's ``SegformerHead`` whose ``fusion_conv`` stores its input maps at
    their own resolution (training, bilinear resizing, Mesa on the
    convolution); otherwise exactly mmseg's forward."""

    def forward(self, inputs):
        if not (self.training and self.interpolate_mode == 'bilinear'
                and _plain_conv_module(self.fusion_conv)):
            return super().forward(inputs)
        # mmseg 1.2.2's SegformerHead.forward. It also resizes the first map to
        # its own size: bilinear at scale 1 returns the map's values unchanged.
        inputs = self._transform_inputs(inputs)
        outs = [conv(x) for conv, x in zip(self.convs, inputs)]
        out = _conv_module_of_resized_cat(self.fusion_conv, outs, self.align_corners)
        return self.cls_seg(out)


def _conv_module_of_resized_cat(module: nn.Module, maps, align_corners: bool):
    """An mmcv ``ConvModule`` (conv, norm, act) applied to the concatenation of
    ``maps`` resized to the first one's size, its conv storing the maps at
    their own resolution (:func:`resized_cat_conv`; empties ``maps``)."""
    feats = resized_cat_conv(maps, align_corners, module.conv)
    if module.with_norm:
        feats = module.norm(feats)
    if module.with_activation:
        feats = module.activate(feats)
    return feats


def _plain_conv_module(module: nn.Module) -> bool:
    """An mmcv ``ConvModule`` whose forward is conv, then norm, then activation."""
    return (tuple(getattr(module, 'order', ())) == ('conv', 'norm', 'act')
            and not getattr(module, 'with_explicit_padding', True)
            and isinstance(getattr(module, 'conv', None), nn.Conv2d))


_STORE_ONCE = {UPerHead: StoreOnceUPerHead, SegformerHead: StoreOnceSegformerHead}


def store_once_heads_(model: nn.Module) -> int:
    """Swap every mmseg ``UPerHead`` / ``SegformerHead`` in ``model`` for its
    store-once class, in place; returns how many."""
    return swap_classes_(model, _STORE_ONCE)
