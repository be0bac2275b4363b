# Mesa version of fpn_pvt_m.py (see fpn_pvt_mesa.py).
_base_ = './fpn_pvt_m.py'
model = dict(
    type='MesaEncoderDecoder',
    mesa=dict(),
    backbone=dict(type='MesaPVT', mesa=dict()))
