# UperNet + Swin-S, same recipe as upernet_swin.py (mmseg model zoo: 47.72 mIoU).
# Local ImageNet weights in mmseg's key layout: --cfg-options
#   model.pretrained=pretrained/swin_small_patch4_window7_224.pth
_base_ = './upernet_swin.py'
model = dict(backbone=dict(depths=[2, 2, 18, 2]))
