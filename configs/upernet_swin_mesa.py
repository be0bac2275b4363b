# Mesa version of upernet_swin.py (same recipe): the Swin-T backbone saves its
# activations for backward in 8 bits, one quantization group per attention
# head, patch embedding in full precision (mesa=dict() = the backbone's
# SWIN_MESA_DEFAULTS; keys are mesa_seg.mesa.MesaPolicy fields). The Swin-S/B
# and AMP Mesa configs inherit this file: Mesa parts live here only.
_base_ = './upernet_swin.py'
model = dict(
    # Mesa for the decode and auxiliary heads goes here, on the segmentor.
    backbone=dict(type='MesaSwinTransformer', mesa=dict()))
