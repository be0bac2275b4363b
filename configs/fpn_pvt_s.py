# Semantic FPN + PVT-Small, same recipe as fpn_pvt.py (the PVT authors'
# released code: AdamW 2e-4, 40k iterations, 8 GPUs x 4 images, 512x512).
# Local ImageNet weights: --cfg-options model.pretrained=pretrained/pvt_small.pth
_base_ = './fpn_pvt.py'
model = dict(backbone=dict(arch='small'))
