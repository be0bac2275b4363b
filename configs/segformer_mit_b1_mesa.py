# Mesa version of segformer_mit_b1.py: the Mesa parts of
# segformer_mit_b0_mesa.py (kept there, in one place) with the B1 delta of
# segformer_mit_b1.py.
_base_ = './segformer_mit_b0_mesa.py'
model = dict(
    backbone=dict(
        embed_dims=64, num_heads=[1, 2, 5, 8], num_layers=[2, 2, 2, 2]),
    decode_head=dict(in_channels=[64, 128, 320, 512]))
