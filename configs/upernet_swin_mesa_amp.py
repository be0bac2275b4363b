# Mesa version of upernet_swin_amp.py: the Mesa parts of upernet_swin_mesa.py
# (kept there, in one place) with fp16 AMP. Under autocast Mesa also stores
# the fp16 activations, and the fp32 ones autocast keeps (LayerNorm and
# softmax inputs), in 8 bits.
_base_ = './upernet_swin_mesa.py'
optim_wrapper = dict(type='AmpOptimWrapper', loss_scale='dynamic')
