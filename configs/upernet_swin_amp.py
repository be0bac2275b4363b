# upernet_swin.py with fp16 mixed precision on GPUs (mmseg's AMP recipe:
# dynamic loss scaling). Without a GPU use `tools/train.py --amp` (bf16).
_base_ = './upernet_swin.py'
optim_wrapper = dict(type='AmpOptimWrapper', loss_scale='dynamic')
