# Full-precision baseline: UperNet + Swin-T on ADE20K, mmseg's published
# recipe (swin-tiny-patch4-window7-in1k-pre_upernet_8xb2-160k_ade20k-512x512):
# AdamW 6e-5, 1500-iter linear warm-up then poly, 160k iterations,
# 8 GPUs x 2 images, SyncBN, UPerHead 512 channels + FCN auxiliary head.
_base_ = [
    '_base_/models/upernet_swin.py', '_base_/datasets/ade20k.py',
    '_base_/default_runtime.py', '_base_/schedules/schedule_160k.py'
]
crop_size = (512, 512)
data_preprocessor = dict(size=crop_size)
model = dict(
    data_preprocessor=data_preprocessor,
    # ImageNet-1k weights come from a local file only (never downloaded), in
    # mmseg's key layout (README, "Pretrained weights"):
    #   --cfg-options model.pretrained=pretrained/swin_tiny_patch4_window7_224.pth  # noqa
    # (convert Microsoft's original file with mmseg's swin2mmseg.py first)
    pretrained=None,
    backbone=dict(
        embed_dims=96,
        depths=[2, 2, 6, 2],
        num_heads=[3, 6, 12, 24],
        window_size=7,
        use_abs_pos_embed=False,
        drop_path_rate=0.3,
        patch_norm=True),
    decode_head=dict(in_channels=[96, 192, 384, 768], num_classes=150),
    auxiliary_head=dict(in_channels=384, num_classes=150))

# AdamW; no weight decay for position embeddings and norms
optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    optimizer=dict(
        type='AdamW', lr=0.00006, betas=(0.9, 0.999), weight_decay=0.01),
    paramwise_cfg=dict(
        custom_keys={
            'absolute_pos_embed': dict(decay_mult=0.),
            'relative_position_bias_table': dict(decay_mult=0.),
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
