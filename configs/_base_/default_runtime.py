# Importing mesa_seg.register runs mesa_seg.register_all_modules(): the compat
# fixes (mmcv-lite, torch.load weights_only, CPU AMP), atomic checkpoint
# writes, and registration of the Mesa models and hooks, so mmseg's own
# tools/train.py works with these configs too.
custom_imports = dict(imports=['mesa_seg.register'], allow_failed_imports=False)
default_scope = 'mmseg'
# mesa_seg.hooks: RNG states in checkpoints (exact resume), checkpoint key
# checks (Mesa <-> FP32 allowed), label range checks per batch, peak memory as
# `memory:` in log lines on CPU too, and on SIGTERM (preemption) a checkpoint
# of the current iteration, then exit code 75. A config that sets custom_hooks
# replaces this list: keep these entries. (The checkpoint hook,
# SafeCheckpointHook, is default_hooks.checkpoint in _base_/schedules/.)
custom_hooks = [
    dict(type='RandomStateHook'),
    dict(type='CheckpointCompatHook'),
    dict(type='LabelRangeHook'),
    dict(type='PeakMemoryHook'),
    dict(type='PreemptionHook')
]
env_cfg = dict(
    cudnn_benchmark=True,
    mp_cfg=dict(mp_start_method='fork', opencv_num_threads=0),
    # GPUs use nccl; tools/train.py switches to gloo on machines without CUDA.
    # timeout (s): how long a collective waits for a rank that stopped
    # answering (hung process, lost node) before every rank stops with exit
    # code 3; a rank that dies is noticed at once. It must exceed the longest
    # time one rank works alone (rank 0 saving a checkpoint, evaluating).
    dist_cfg=dict(backend='nccl', timeout=600),
)
vis_backends = [dict(type='LocalVisBackend')]
visualizer = dict(
    type='SegLocalVisualizer', vis_backends=vis_backends, name='visualizer')
log_processor = dict(by_epoch=False)
log_level = 'INFO'
load_from = None
resume = False

tta_model = dict(type='SegTTAModel')
