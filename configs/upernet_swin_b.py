# UperNet + Swin-B (window 7, ImageNet-1k), same recipe as upernet_swin.py, as
# mmseg's swin-base-patch4-window7-in1k-pre_upernet_8xb2-160k_ade20k-512x512.
# Local ImageNet weights in mmseg's key layout:
#   --cfg-options model.pretrained=pretrained/swin_base_patch4_window7_224.pth
_base_ = './upernet_swin.py'
model = dict(
    backbone=dict(
        embed_dims=128, depths=[2, 2, 18, 2], num_heads=[4, 8, 16, 32]),
    decode_head=dict(in_channels=[128, 256, 512, 1024]),
    auxiliary_head=dict(in_channels=512))
