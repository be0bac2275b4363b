# Mesa version of upernet_swin_s.py: the Mesa parts of upernet_swin_mesa.py
# (kept there, in one place) with the Swin-S delta of upernet_swin_s.py.
_base_ = './upernet_swin_mesa.py'
model = dict(backbone=dict(depths=[2, 2, 18, 2]))
