# Semantic FPN + PVTv2-B0 on ADE20K, the fpn_pvt.py recipe (the PVT authors'
# released code: AdamW 2e-4, 40k iterations, 8 GPUs x 4 images, 512x512) with
# the PVTv2 backbone.
# Local ImageNet weights (official pvt_v2_b0.pth, or timm's converted by
# tools/model_converters/pvt_v2_timm2official.py):
#   --cfg-options model.pretrained=pretrained/pvt_v2_b0.pth
_base_ = './fpn_pvt.py'
model = dict(
    backbone=dict(type='PVTv2', arch='b0'),
    neck=dict(in_channels=[32, 64, 160, 256]))
