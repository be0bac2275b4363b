# segformer_mit_b0_mesa.py with torch's fused attention in the MiT backbone
# (scaled_dot_product_attention): no N x M attention probabilities are stored,
# 8-bit or otherwise. The forward equals torch's SDPA bit for bit, not mmseg's
# explicit attention (a different kernel: the same attention up to float
# rounding). README, "Fused attention", has the measured trade-off.
_base_ = './segformer_mit_b0_mesa.py'
model = dict(backbone=dict(fused_attention=True))
