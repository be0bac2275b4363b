# SegFormer MiT-B2, same recipe as segformer_mit_b0.py, as mmseg's
# segformer_mit-b2_8xb2-160k_ade20k-512x512. Local ImageNet weights in mmseg's
# key layout (mit_b2_20220624-66e8bf70.pth, or mit_b2.pth converted with
# mmseg's mit2mmseg.py): --cfg-options model.pretrained=pretrained/mit_b2.pth
_base_ = './segformer_mit_b0.py'
model = dict(
    backbone=dict(
        embed_dims=64, num_heads=[1, 2, 5, 8], num_layers=[3, 4, 6, 3]),
    decode_head=dict(in_channels=[64, 128, 320, 512]))
