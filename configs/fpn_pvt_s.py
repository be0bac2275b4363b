# Semantic FPN + PVT-Small, same recipe as fpn_pvt.py. Paper: 39.8 mIoU.
# Local ImageNet weights: --cfg-options model.pretrained=pretrained/pvt_small.pth
_base_ = './fpn_pvt.py'
model = dict(backbone=dict(arch='small'))
