# CPU-sized demo of ../upernet_swin.py (full precision) on the embedded demo
# dataset (python tools/make_demo_data.py data/demo_ade); the FP32 reference
# for `make demo`, which trains upernet_swin_mesa_demo.py (this file plus the
# Mesa parts).
# Overrides only data root, crop/scale, iterations, batch, evaluation and
# logging intervals, BN and the learning rate; the model and optimizer are the
# real recipe (tests/test_configs.py checks).
_base_ = ['../upernet_swin.py']
data_root = 'data/demo_ade'
crop_size = (96, 96)
scale = (384, 96)  # ADE20K's (2048, 512) scaled like the crop
max_iters = 40  # validation mIoU after these: README, "Demo"
warmup_iters = 10

train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(
        type='RandomResize',
        scale=scale,
        ratio_range=(0.5, 2.0),
        keep_ratio=True),
    dict(type='RandomCrop', crop_size=crop_size, cat_max_ratio=0.75),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PhotoMetricDistortion'),
    dict(type='PackSegInputs')
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=scale, keep_ratio=True),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='PackSegInputs')
]
train_dataloader = dict(
    batch_size=4,
    num_workers=1,
    dataset=dict(data_root=data_root, pipeline=train_pipeline))
val_dataloader = dict(
    num_workers=1,
    dataset=dict(data_root=data_root, pipeline=test_pipeline))
test_dataloader = val_dataloader

norm_cfg = dict(type='BN', requires_grad=True)
model = dict(
    data_preprocessor=dict(size=crop_size),
    decode_head=dict(norm_cfg=norm_cfg),
    auxiliary_head=dict(norm_cfg=norm_cfg))

# From scratch (no pretrained weights) in 40 iterations: 10x the recipe's
# fine-tuning lr, and its 1500-iteration warm-up scaled to the schedule.
optim_wrapper = dict(optimizer=dict(lr=6e-4))
param_scheduler = [
    dict(
        type='LinearLR',
        start_factor=1e-6,
        by_epoch=False,
        begin=0,
        end=warmup_iters),
    dict(
        type='PolyLR',
        eta_min=0.0,
        power=1.0,
        begin=warmup_iters,
        end=max_iters,
        by_epoch=False)
]
train_cfg = dict(max_iters=max_iters, val_interval=max_iters)
default_hooks = dict(
    logger=dict(interval=10),
    checkpoint=dict(interval=max_iters, max_keep_ckpts=1))
randomness = dict(seed=0)
