"""CheckpointCompatHook: FP32 and Mesa checkpoints load into each other, any
other difference fails.

mmengine loads ``load_from`` and resumed checkpoints with ``strict=False``, so
mismatched weights only warn. The check itself is
:func:`mesa_seg.models.checkpoint.match_state_dict` (pure state-dict logic,
also used by :func:`mesa_seg.preflight.check_checkpoint` before the Runner is
built).
"""
from mmengine.hooks import Hook
from mmengine.logging import print_log
from mmengine.model import is_model_wrapper
from mmengine.registry import HOOKS

from ..errors import CheckpointMismatchError
from ..models.checkpoint import match_state_dict

__all__ = ['CheckpointCompatHook']


@HOOKS.register_module()
class CheckpointCompatHook(Hook):
    """Checks every checkpoint the Runner loads (``load_from``, resume,
    ``tools/test.py``) with :func:`match_state_dict`: Mesa and full-precision
    checkpoints load into each other; any other difference raises
    :class:`~mesa_seg.errors.CheckpointMismatchError` listing the keys,
    instead of mmengine's warning.

    Fires ``after_load_checkpoint``, before mmengine copies the weights into
    the model. Logs one line when it drops the checkpoint's quantizer buffers
    (their layers are full precision in this model) and one when the model's
    quantizer buffers are missing from the checkpoint (they initialise from
    the first training batch).

    Args:
        strict (bool): False restores mmengine's behaviour for the other
            differences (a warning, partial load), e.g. to fine-tune from a
            checkpoint with another number of classes. Default: True.
    """

    priority = 'VERY_HIGH'

    def __init__(self, strict: bool = True):
        self.strict = strict

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        model = runner.model.module if is_model_wrapper(runner.model) \
            else runner.model
        state_dict = checkpoint.get('state_dict', checkpoint)
        try:
            extra, absent = match_state_dict(model, state_dict)
        except CheckpointMismatchError:
            if self.strict:
                raise
            return  # mmengine loads what fits and warns
        for key in extra:
            del state_dict[key]
        if extra:
            print_log(
                f'Mesa: ignored {len(extra)} quantizer buffers (running '
                'ranges) of the checkpoint: their layers are full precision '
                'in this model.',
                logger='current')
        if absent:
            print_log(
                f'Mesa: the checkpoint has no running ranges for '
                f'{len(absent)} quantizer buffers; they initialise from the '
                'first training batch.',
                logger='current')
