# Full-precision baseline: Semantic FPN + PVT-Tiny on ADE20K with the recipe
# of the PVT authors' released code
# (whai362/PVT segmentation/configs/sem_fpn/PVT/fpn_pvt_t_ade20k_40k.py):
# AdamW lr 2e-4, weight decay 1e-4, poly decay (power 0.9) to 0, 40k
# iterations, 8 GPUs x 4 images (total batch 32), 512x512 crops, SyncBN.
# That code doubles the paper's 4 GPUs x 4 images and lr 1e-4 and halves its
# 80k iterations (its comment: "we use 8 gpu instead of 4 in mmsegmentation,
# so lr*2 and max_iters/2").
_base_ = [
    '_base_/models/fpn_pvt.py', '_base_/datasets/ade20k.py',
    '_base_/default_runtime.py', '_base_/schedules/schedule_40k.py'
]
crop_size = (512, 512)
data_preprocessor = dict(size=crop_size)
model = dict(
    data_preprocessor=data_preprocessor,
    # ImageNet-1k weights come from a local file only (never downloaded).
    # With the authors' pvt_tiny.pth in pretrained/ (README, "Pretrained
    # weights") add:
    #   --cfg-options model.pretrained=pretrained/pvt_tiny.pth
    pretrained=None,
    backbone=dict(arch='tiny'),
    decode_head=dict(num_classes=150))

optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=0.0002, weight_decay=0.0001))
param_scheduler = [
    dict(
        type='PolyLR',
        eta_min=0.0,
        power=0.9,
        begin=0,
        end=40000,
        by_epoch=False)
]

# 8 GPUs x 4 images per GPU (total batch 32)
train_dataloader = dict(batch_size=4)
val_dataloader = dict(batch_size=1)
test_dataloader = val_dataloader
