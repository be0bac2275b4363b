# Mesa version of upernet_swin.py (same recipe): activations saved for
# backward in 8 bits in the Swin-T backbone (one quantization group per
# attention head, patch embedding in full precision: mesa=dict() = the
# backbone's SWIN_MESA_DEFAULTS), in the UPerHead/FCN heads (Conv2d/BN/ReLU,
# per-channel ranges widened to cover each batch: mesa=dict() =
# HEAD_MESA_DEFAULTS) and the exact fused resize + cross-entropy loss. Policy
# keys are mesa_seg.mesa.MesaPolicy fields.
_base_ = './upernet_swin.py'
model = dict(
    type='MesaEncoderDecoder',
    mesa=dict(),
    backbone=dict(type='MesaSwinTransformer', mesa=dict()))
