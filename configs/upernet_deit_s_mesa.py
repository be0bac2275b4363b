# Mesa version of upernet_deit_s.py (same recipe): activations saved for
# backward in 8 bits in the DeiT-S backbone (attention q/k/v and probabilities
# one group per head, LayerNorm/Linear/GELU inputs one channel group per head,
# the patch embedding in full precision: mesa=dict() = the backbone's
# VIT_MESA_DEFAULTS), in the UPerHead/FCN heads (Conv2d/BN/ReLU, per-channel
# ranges widened to cover each batch: mesa=dict() = HEAD_MESA_DEFAULTS) and the
# exact fused resize + cross-entropy loss. Policy keys are
# mesa_seg.mesa.MesaPolicy fields.
# Option: backbone.fused_attention=True (off here: the forward stays
# bit-identical to the baseline's) calls torch's fused attention, which
# stores no N x M probabilities: less memory and time, the same attention
# up to float rounding (MesaVisionTransformer's docstring).
_base_ = './upernet_deit_s.py'
model = dict(
    type='MesaEncoderDecoder',
    mesa=dict(),
    backbone=dict(type='MesaVisionTransformer', mesa=dict()))
