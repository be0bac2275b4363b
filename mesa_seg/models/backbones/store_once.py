"""mmcv's ``FFN`` and mmseg's ``MixFFN`` storing their hidden activation
once under Mesa.

mmcv's ``FFN`` (Swin's and ViT's MLP) runs ``Linear -> GELU -> Dropout ->
Linear``, MiT's ``MixFFN`` the same with 1x1 convs around a depth-wise conv.
Under Mesa, GELU keeps an 8-bit copy of its input and the output layer another
of GELU's output; :class:`StoreOnceFFN` and :class:`StoreOnceMixFFN` keep only
the first and recompute GELU in backward
(:func:`~mesa_seg.mesa.shared_ops.gelu_project`). Class swaps
(:func:`store_once_ffns_`): same modules, ``state_dict`` and forward output.
"""
import torch
from mmcv.cnn.bricks.transformer import FFN
from mmseg.models.backbones.mit import MixFFN
from mmseg.models.utils import nchw_to_nlc, nlc_to_nchw
from torch import nn

from ...mesa.shared_ops import gelu_project
from ..torch_layers import swap_classes_

__all__ = ['StoreOnceFFN', 'StoreOnceMixFFN', 'store_once_ffns_']


class StoreOnceFFN(FFN):
    """mmcv's ``FFN`` whose last activation and output Linear store one 8-bit
    copy of the hidden activation (training, Mesa on, ``ffn_drop == 0``);
    otherwise exactly mmcv's forward."""

    def forward(self, x, identity=None):
        # mmcv's FFN.forward with layers = [Seq(fc, act, drop)] * (num_fcs - 1)
        # + [fc_out, drop_out]
        *hidden, last, fc_out, drop_out = self.layers
        out = x
        for block in hidden:
            out = block(out)
        fc, act, drop = last
        out = drop_out(gelu_project(fc(out), act, drop, fc_out))
        out = self.gamma2(out)
        if not self.add_identity:
            return self.dropout_layer(out)
        if identity is None:
            identity = x
        return identity + self.dropout_layer(out)


class StoreOnceMixFFN(MixFFN):
    """mmseg's ``MixFFN`` whose GELU and output conv store one 8-bit copy of
    the hidden map, GELU's input (training, Mesa on, ``ffn_drop == 0``);
    otherwise exactly mmseg's forward."""

    def forward(self, x: torch.Tensor, hw_shape, identity=None) -> torch.Tensor:
        # mmseg's MixFFN.forward with layers = [fc1, pe_conv, act, drop, fc2, drop]
        fc1, pe_conv, act, drop, fc2, drop_out = self.layers
        out = nlc_to_nchw(x, hw_shape)
        out = drop_out(gelu_project(pe_conv(fc1(out)), act, drop, fc2))
        out = nchw_to_nlc(out)
        if identity is None:
            identity = x
        return identity + self.dropout_layer(out)


_STORE_ONCE = {FFN: StoreOnceFFN, MixFFN: StoreOnceMixFFN}


def store_once_ffns_(model: nn.Module) -> int:
    """Swap every mmcv ``FFN`` and mmseg ``MixFFN`` in ``model`` for its
    store-once class, in place; returns how many."""
    return swap_classes_(model, _STORE_ONCE)
