# upernet_deit_s_mesa.py with torch's fused attention in the DeiT-S backbone
# (scaled_dot_product_attention): no N x N attention probabilities are stored,
# 8-bit or otherwise. The forward equals torch's SDPA bit for bit, not mmseg's
# explicit attention (a different kernel: the same attention up to float
# rounding). README, "Fused attention", has the measured trade-off.
_base_ = './upernet_deit_s_mesa.py'
model = dict(backbone=dict(fused_attention=True))
