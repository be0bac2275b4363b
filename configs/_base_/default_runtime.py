# Importing mesa_seg applies the compat fixes (mmcv-lite, torch.load
# weights_only, CPU AMP) and registers the Mesa models, so mmseg's own
# tools/train.py works with these configs too.
custom_imports = dict(imports=['mesa_seg'], allow_failed_imports=False)
default_scope = 'mmseg'
# mesa_seg.resilience: RNG states in checkpoints (exact resume), checkpoint
# key checks (Mesa <-> FP32 allowed), label range checks per batch. A config
# that sets custom_hooks replaces this list: keep these entries.
custom_hooks = [
    dict(type='RandomStateHook'),
    dict(type='CheckpointCompatHook'),
    dict(type='LabelRangeHook'),
    # mesa_seg.hooks: peak memory as `memory:` in log lines on CPU too
    dict(type='PeakMemoryHook')
]
env_cfg = dict(
    cudnn_benchmark=True,
    mp_cfg=dict(mp_start_method='fork', opencv_num_threads=0),
    # GPUs use nccl; tools/train.py switches to gloo on machines without CUDA
    dist_cfg=dict(backend='nccl'),
)
vis_backends = [dict(type='LocalVisBackend')]
visualizer = dict(
    type='SegLocalVisualizer', vis_backends=vis_backends, name='visualizer')
log_processor = dict(by_epoch=False)
log_level = 'INFO'
load_from = None
resume = False

tta_model = dict(type='SegTTAModel')
