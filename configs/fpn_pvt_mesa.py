# Mesa version of fpn_pvt.py (same recipe): activations saved for backward in
# 8 bits in the backbone (per-head groups in attention), the FPN neck and head
# (Conv2d/BN/ReLU, per-channel ranges), and the exact fused resize + cross-entropy loss. The policy
# dicts are mesa_seg.mesa.MesaPolicy fields; empty = the core's defaults.
_base_ = './fpn_pvt.py'
model = dict(
    type='MesaEncoderDecoder',
    mesa=dict(groups='channels'),
    backbone=dict(type='MesaPVT', mesa=dict()))
