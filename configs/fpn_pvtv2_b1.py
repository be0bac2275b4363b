# Semantic FPN + PVTv2-B1, same recipe as fpn_pvtv2_b0.py.
# Local ImageNet weights: --cfg-options model.pretrained=pretrained/pvt_v2_b1.pth
_base_ = './fpn_pvtv2_b0.py'
model = dict(
    backbone=dict(arch='b1'),
    neck=dict(in_channels=[64, 128, 320, 512]))
