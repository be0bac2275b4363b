# Semantic FPN + PVT-Medium, same recipe as fpn_pvt.py. Paper: 41.6 mIoU.
# Local ImageNet weights: --cfg-options model.pretrained=pretrained/pvt_medium.pth
_base_ = './fpn_pvt.py'
model = dict(backbone=dict(arch='medium'))
