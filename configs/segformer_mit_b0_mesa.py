# Mesa version of segformer_mit_b0.py (same recipe): activations saved for
# backward in 8 bits in the MiT backbone (attention q/k/v and probabilities one
# group per head, LayerNorm/conv/GELU inputs one channel group per head; only
# the first patch embedding's conv, which reads the image, in full precision:
# mesa=dict() = the backbone's MIT_MESA_DEFAULTS), in the SegformerHead
# (Conv2d/BN/ReLU, per-channel ranges widened to cover each batch: mesa=dict()
# = HEAD_MESA_DEFAULTS) and the exact fused resize + cross-entropy loss.
# Policy keys are mesa_seg.mesa.MesaPolicy fields.
# Option: backbone.fused_attention=True (off here: the forward stays
# bit-identical to the baseline's) calls torch's fused attention, which
# stores no N x M probabilities: less memory and time, the same attention
# up to float rounding (MesaMixVisionTransformer's docstring).
_base_ = './segformer_mit_b0.py'
model = dict(
    type='MesaEncoderDecoder',
    mesa=dict(),
    backbone=dict(type='MesaMixVisionTransformer', mesa=dict()))
