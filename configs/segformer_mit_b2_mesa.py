# Mesa version of segformer_mit_b2.py: the Mesa parts of
# segformer_mit_b0_mesa.py (kept there, in one place) with the B2 delta of
# segformer_mit_b2.py.
_base_ = './segformer_mit_b0_mesa.py'
model = dict(
    backbone=dict(
        embed_dims=64, num_heads=[1, 2, 5, 8], num_layers=[3, 4, 6, 3]),
    decode_head=dict(in_channels=[64, 128, 320, 512]))
