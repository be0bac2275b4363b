# Mesa version of fpn_pvtv2_b2.py (see fpn_pvt_mesa.py).
_base_ = './fpn_pvtv2_b2.py'
model = dict(
    type='MesaEncoderDecoder',
    mesa=dict(),
    backbone=dict(type='MesaPVTv2', mesa=dict()))
