"""mmcv's ``FFN`` storing its hidden activation once under Mesa.

mmcv's ``FFN`` (Swin's and ViT's MLP) runs ``Linear -> GELU -> Dropout ->
Linear``. Under Mesa, GELU keeps an 8-bit copy of its input and the output
Linear another of GELU's output; :class:`StoreOnceFFN` keeps only the first
and recomputes GELU in backward
(:func:`~mesa_seg.mesa.shared_ops.gelu_project`). A class swap: same modules,
``state_dict`` and forward output.
"""
from mmcv.cnn.bricks.transformer import FFN
from torch import nn

from ...mesa.shared_ops import gelu_project

__all__ = ['StoreOnceFFN', 'store_once_ffns_']


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


def store_once_ffns_(model: nn.Module) -> int:
    """Swap every mmcv ``FFN`` in ``model`` for :class:`StoreOnceFFN`, in
    place; returns how many."""
    swapped = 0
    for module in model.modules():
        if type(module) is FFN:
            module.__class__ = StoreOnceFFN
            swapped += 1
    return swapped
