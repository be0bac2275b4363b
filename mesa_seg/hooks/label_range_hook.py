"""LabelRangeHook: a label outside the class range names its file.

Without it such a label crashes the loss deep in a run (on CUDA as a
device-side assert). :func:`mesa_seg.preflight.check_dataset` decodes every
annotation of datasets up to ``CONTENT_CHECK_LIMIT`` images before training;
larger ones rely on this hook.
"""
from typing import Optional

from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from mmengine.registry import HOOKS

from ..errors import LabelError

__all__ = ['LabelRangeHook']


@HOOKS.register_module()
class LabelRangeHook(Hook):
    """Checks each training batch's labels against the decode head's classes
    before the step, naming the annotation file of a bad label (the loss
    would fail with an index error, on CUDA a device-side assert).

    Fires ``before_train_iter``. Logs nothing; a label outside
    ``[0, num_classes)`` that is not ``ignore_index`` raises
    :class:`~mesa_seg.errors.LabelError` (one line, exit 2 in ``tools/``).
    """

    priority = 'NORMAL'

    def before_train_iter(self, runner, batch_idx: int,
                          data_batch: Optional[dict] = None) -> None:
        if not data_batch or 'data_samples' not in data_batch:
            return
        model = runner.model.module if is_model_wrapper(runner.model) \
            else runner.model
        head = getattr(model, 'decode_head', None)
        num_classes = getattr(head, 'num_classes', None)
        if num_classes is None:
            return
        ignore = getattr(head, 'ignore_index', 255)
        for sample in data_batch['data_samples']:
            seg = getattr(sample, 'gt_sem_seg', None)
            if seg is None:
                continue
            label = seg.data
            bad = ((label < 0) | (label >= num_classes)) & (label != ignore)
            if bool(bad.any()):
                values = sorted(int(v) for v in label[bad].unique()[:5])
                raise LabelError(
                    f'label values {values} outside [0, {num_classes}) (and '
                    f'not ignore_index {ignore}) in '
                    f'{sample.metainfo.get("seg_map_path", "a sample")} '
                    f'(after the pipeline{_reduce_note(sample)}); fix the '
                    'annotation or num_classes')


def _reduce_note(sample) -> str:
    return ', reduce_zero_label: raw value v becomes v - 1, 0 is ignored' \
        if sample.metainfo.get('reduce_zero_label') else ''
