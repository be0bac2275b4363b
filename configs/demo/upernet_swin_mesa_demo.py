# CPU-sized demo of ../upernet_swin_mesa.py (the flagship: Mesa UperNet-Swin-T)
# on the embedded demo dataset; run by `make demo` (tools/demo.py).
# upernet_swin_demo.py (the same demo schedule, in full precision) plus
# exactly the Mesa parts that ../upernet_swin_mesa.py adds to
# ../upernet_swin.py (tests/test_configs.py checks both).
_base_ = ['./upernet_swin_demo.py']
model = dict(
    type='MesaEncoderDecoder',
    mesa=dict(),
    backbone=dict(type='MesaSwinTransformer', mesa=dict()))
