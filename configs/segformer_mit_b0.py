# Full-precision baseline: SegFormer MiT-B0 on ADE20K, mmseg's published recipe
# (segformer_mit-b0_8xb2-160k_ade20k-512x512): AdamW 6e-5 (head lr x10, no
# weight decay for norms and position blocks), 1500-iter linear warm-up then
# poly, 160k iterations, 8 GPUs x 2 images, 512x512 crops.
# ImageNet-1k weights come from a local file only (never downloaded), in
# mmseg's key layout: mmseg's converted mit_b0_20220624-7e0fe6dd.pth, or the
# SegFormer authors' mit_b0.pth converted with
#   python .venv/lib/python3.11/site-packages/mmseg/.mim/tools/model_converters/mit2mmseg.py mit_b0.pth pretrained/mit_b0.pth  # noqa
# then: --cfg-options model.pretrained=pretrained/mit_b0.pth
_base_ = [
    '_base_/models/segformer_mit.py', '_base_/datasets/ade20k.py',
    '_base_/default_runtime.py', '_base_/schedules/schedule_160k.py'
]
crop_size = (512, 512)
data_preprocessor = dict(size=crop_size)
model = dict(
    data_preprocessor=data_preprocessor,
    pretrained=None,
    decode_head=dict(num_classes=150))

optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    optimizer=dict(
        type='AdamW', lr=0.00006, betas=(0.9, 0.999), weight_decay=0.01),
    paramwise_cfg=dict(
        custom_keys={
            'pos_block': dict(decay_mult=0.),
            'norm': dict(decay_mult=0.),
            'head': dict(lr_mult=10.)
        }))

param_scheduler = [
    dict(
        type='LinearLR', start_factor=1e-6, by_epoch=False, begin=0, end=1500),
    dict(
        type='PolyLR',
        eta_min=0.0,
        power=1.0,
        begin=1500,
        end=160000,
        by_epoch=False,
    )
]

# 8 GPUs x 2 images per GPU (total batch 16)
train_dataloader = dict(batch_size=2, num_workers=2)
val_dataloader = dict(batch_size=1, num_workers=4)
test_dataloader = val_dataloader
