# SegFormer MiT-B1, same recipe as segformer_mit_b0.py, as mmseg's
# segformer_mit-b1_8xb2-160k_ade20k-512x512. Local ImageNet weights in mmseg's
# key layout (mit_b1_20220624-02e5a6a1.pth, or mit_b1.pth converted with
# mmseg's mit2mmseg.py): --cfg-options model.pretrained=pretrained/mit_b1.pth
_base_ = './segformer_mit_b0.py'
model = dict(
    backbone=dict(
        embed_dims=64, num_heads=[1, 2, 5, 8], num_layers=[2, 2, 2, 2]),
    decode_head=dict(in_channels=[64, 128, 320, 512]))
