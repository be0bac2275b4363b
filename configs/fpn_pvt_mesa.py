# Mesa version of fpn_pvt.py (same recipe): activations saved for backward in
# 8 bits in the PVT backbone (one quantization group per attention head, first
# patch embedding in full precision: mesa=dict() = the backbone's
# PVT_MESA_DEFAULTS), in the FPN neck and head (Conv2d/BN/ReLU, per-channel
# ranges widened to cover each batch: mesa=dict() = HEAD_MESA_DEFAULTS) and
# the exact fused resize + cross-entropy loss. Policy keys are
# mesa_seg.mesa.MesaPolicy fields.
_base_ = './fpn_pvt.py'
model = dict(
    type='MesaEncoderDecoder',
    mesa=dict(),
    backbone=dict(type='MesaPVT', mesa=dict()))
