# Full-precision baseline: UperNet + DeiT-S/16 on ADE20K, mmseg's published
# recipe (vit_deit-s16_upernet_8xb2-160k_ade20k-512x512): ViT
# backbone with 384 channels, 6 heads, drop path 0.1, no neck, UPerHead +
# FCN auxiliary head; AdamW 6e-5 (no weight decay for position embedding, class
# token and norms), 1500-iter linear warm-up then poly, 160k iterations,
# 8 GPUs x 2 images, 512x512 crops. (mmseg 1.x's config file inherits its
# 80k schedule by mistake; the released model was trained for 160k, as here.)
# ImageNet-1k weights come from a local file only (never downloaded), in
# mmseg's key layout: Facebook's deit_small_patch16_224-cd65a155.pth
# converted with
#   python .venv/lib/python3.11/site-packages/mmseg/.mim/tools/model_converters/vit2mmseg.py deit_small_patch16_224-cd65a155.pth pretrained/deit_small_patch16_224.pth  # noqa
# then: --cfg-options model.pretrained=pretrained/deit_small_patch16_224.pth
_base_ = [
    '_base_/models/upernet_vit.py', '_base_/datasets/ade20k.py',
    '_base_/default_runtime.py', '_base_/schedules/schedule_160k.py'
]
crop_size = (512, 512)
data_preprocessor = dict(size=crop_size)
model = dict(
    data_preprocessor=data_preprocessor,
    pretrained=None,
    backbone=dict(num_heads=6, embed_dims=384, drop_path_rate=0.1),
    neck=None,
    decode_head=dict(num_classes=150, in_channels=[384, 384, 384, 384]),
    auxiliary_head=dict(num_classes=150, in_channels=384))

# AdamW; no weight decay for position embedding, class token and norms
optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    optimizer=dict(
        type='AdamW', lr=0.00006, betas=(0.9, 0.999), weight_decay=0.01),
    paramwise_cfg=dict(
        custom_keys={
            'pos_embed': dict(decay_mult=0.),
            'cls_token': dict(decay_mult=0.),
            'norm': dict(decay_mult=0.)
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
train_dataloader = dict(batch_size=2)
val_dataloader = dict(batch_size=1)
test_dataloader = val_dataloader
