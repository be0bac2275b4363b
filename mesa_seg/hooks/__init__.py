"""mmengine hooks of mesa-seg, one per file (as ``mmseg/engine/hooks/``).

Importing this package registers them in mmengine's ``HOOKS``;
:func:`mesa_seg.register_all_modules` does. ``configs/_base_/default_runtime.py``
turns all of them on (SafeCheckpointHook as ``default_hooks.checkpoint``,
set in ``configs/_base_/schedules/``):

- :class:`RandomStateHook`: RNG states in checkpoints (exact resume);
- :class:`CheckpointCompatHook`: Mesa <-> FP32 checkpoints load, any other
  mismatch fails listing the keys;
- :class:`LabelRangeHook`: labels outside the class range name their file;
- :class:`PeakMemoryHook`: peak memory as ``memory:`` in log lines on CPU too;
- :class:`SafeCheckpointHook`: mmengine's CheckpointHook that deletes old
  checkpoints only after the new one is on disk, stops every rank with one
  line when a save fails, and keeps each rank's state for exact resume;
- :class:`PreemptionHook`: on SIGTERM, saves the current iteration and stops
  (exit code 75).
"""
from .checkpoint_compat_hook import CheckpointCompatHook
from .label_range_hook import LabelRangeHook
from .peak_memory_hook import PeakMemoryHook
from .preemption_hook import PreemptionHook
from .random_state_hook import (RandomStateHook, get_random_state,
                                set_random_state)
from .safe_checkpoint_hook import SafeCheckpointHook

__all__ = [
    'CheckpointCompatHook', 'LabelRangeHook', 'PeakMemoryHook',
    'PreemptionHook', 'RandomStateHook', 'SafeCheckpointHook',
    'get_random_state', 'set_random_state'
]
