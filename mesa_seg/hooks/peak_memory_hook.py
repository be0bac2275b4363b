"""PeakMemoryHook: peak memory in every training log line, on CPU too."""
from typing import Optional

from mmengine.device import is_cuda_available, is_musa_available
from mmengine.hooks import Hook, LoggerHook
from mmengine.registry import HOOKS

from ..memory.meters import peak_rss_bytes, reset_peak_rss, rss_bytes

__all__ = ['PeakMemoryHook']

MiB = 1024 ** 2


@HOOKS.register_module()
class PeakMemoryHook(Hook):
    """Puts peak memory in every training log line, as ``memory`` (MiB).

    On GPUs mmengine's ``LogProcessor`` already logs ``memory:``, the peak of
    ``torch.cuda.max_memory_allocated`` since the previous log line, and this
    hook leaves it alone. Without one it logs the same field from the process's
    peak resident memory (``VmHWM``, reset after each log line, so each line
    shows the peak since the previous one): weights, optimizer state,
    activations, Python and libraries (dataloader workers are separate
    processes). It reads one ``/proc`` file per log line and no profiler runs.

    Fires ``before_train`` (first value, which fixes the field's place in the
    line) and ``after_train_iter`` on the iterations where the runner's
    ``LoggerHook`` writes a line (its ``interval``, and the end of an epoch).
    Logs nothing of its own: it sets the ``train/memory`` scalar that the
    LoggerHook prints.
    """

    priority = 'NORMAL'  # after_train_iter must run before LoggerHook's (BELOW_NORMAL)

    def __init__(self):
        self._active = False

    def before_train(self, runner) -> None:
        self._active = not (is_cuda_available() or is_musa_available())
        if self._active:
            reset_peak_rss()
            # The first update fixes the field's place in the log line: right
            # after time/data_time and before the losses, as on GPUs.
            runner.message_hub.update_scalar('train/memory', rss_bytes() // MiB)

    def after_train_iter(self, runner, batch_idx: int, data_batch=None,
                         outputs: Optional[dict] = None) -> None:
        if not self._active or not self._logs_now(runner, batch_idx):
            return
        runner.message_hub.update_scalar('train/memory', peak_rss_bytes() // MiB)
        reset_peak_rss()

    @staticmethod
    def _logs_now(runner, batch_idx: int) -> bool:
        """Whether the runner's LoggerHook writes a line after this iteration
        (its own condition, see ``LoggerHook.after_train_iter``)."""
        logger = next((h for h in runner.hooks if isinstance(h, LoggerHook)), None)
        if logger is None:
            return False
        if logger.every_n_inner_iters(batch_idx, logger.interval):
            return True
        return logger.end_of_epoch(runner.train_dataloader, batch_idx) and (
            not logger.ignore_last or len(runner.train_dataloader) <= logger.interval)
