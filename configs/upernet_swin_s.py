# UperNet + Swin-S, same recipe as upernet_swin.py, as mmseg's
# swin-small-patch4-window7-in1k-pre_upernet_8xb2-160k_ade20k-512x512.
# Local ImageNet weights in mmseg's key layout: --cfg-options
#   model.pretrained=pretrained/swin_small_patch4_window7_224.pth
_base_ = './upernet_swin.py'
model = dict(backbone=dict(depths=[2, 2, 18, 2]))
