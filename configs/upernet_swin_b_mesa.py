# Mesa version of upernet_swin_b.py: the Mesa parts of upernet_swin_mesa.py
# (kept there, in one place) with the Swin-B delta of upernet_swin_b.py.
_base_ = './upernet_swin_mesa.py'
model = dict(
    backbone=dict(
        embed_dims=128, depths=[2, 2, 18, 2], num_heads=[4, 8, 16, 32]),
    decode_head=dict(in_channels=[128, 256, 512, 1024]),
    auxiliary_head=dict(in_channels=512))
