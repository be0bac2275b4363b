"""SafeCheckpointHook: mmengine's CheckpointHook without its ways of losing
the newest good checkpoint, and with what exact multi-rank resume needs.

mmengine 0.10.7's ``CheckpointHook`` deletes the oldest kept checkpoint (and
the previous best one) *before* writing the new one: with
``max_keep_ckpts=1`` a save that fails (disk full) leaves no checkpoint at
all. It writes ``last_checkpoint`` in place, and a distributed save failure
on rank 0 leaves the other ranks waiting in the next collective.
"""
from __future__ import annotations

import contextlib
import errno
import os
import os.path as osp
from typing import List, Optional

from mmengine.dist import get_dist_info, is_main_process
from mmengine.fileio import LocalBackend
from mmengine.hooks import CheckpointHook
from mmengine.logging import print_log
from mmengine.model import is_model_wrapper
from mmengine.registry import HOOKS

from ..distributed import rank0_ok
from ..errors import CheckpointSaveError, UsageError
from ..fileio import atomic_write, temp_target
from .random_state_hook import RANK_STATES_KEY, get_random_state

__all__ = ['SafeCheckpointHook', 'world_size_message']


def world_size_message(path: str, saved: int, current: int) -> str:
    """The refusal to resume ``path`` (trained on ``saved`` ranks) on
    ``current`` ranks."""
    return (
        f'{path} was trained on {saved} rank{"s" if saved > 1 else ""}, this '
        f'run has {current}: the global batch, the data order and the '
        'per-rank state (RNG, running statistics) would change, so --resume '
        f'would not continue the same run. Resume on {saved} '
        f'rank{"s" if saved > 1 else ""}, or continue anyway (not equivalent '
        'to the uninterrupted run; the learning rate is not rescaled) with '
        '--cfg-options default_hooks.checkpoint.allow_world_size_change=True')


@HOOKS.register_module()
class SafeCheckpointHook(CheckpointHook):
    """mmengine's ``CheckpointHook`` (same arguments and files) that never
    loses the newest good checkpoint:

    - the new checkpoint is written durably first (temporary file, fsync,
      rename, fsync of the folder: :func:`mesa_seg.fileio.atomic_write`),
      then ``last_checkpoint`` (atomically too), and only then is the
      checkpoint that falls out of ``max_keep_ckpts`` (or the previous best)
      deleted;
    - a save that fails (disk full, I/O error) raises
      :class:`~mesa_seg.errors.CheckpointSaveError` on every rank (rank 0
      broadcasts the outcome), one line naming the file, the reason and the
      previous checkpoint, which is intact;
    - at the start of training, temporary files left by a save that was
      killed are removed, with a log line each;
    - every checkpoint records the world size (``meta['world_size']``);
      resuming on another number of ranks is refused
      (:class:`~mesa_seg.errors.UsageError`) unless ``allow_world_size_change``;
    - in distributed runs, each periodic checkpoint also holds every rank's
      buffers (Mesa's running ranges, BN statistics, which ranks keep apart)
      and RNG states under ``checkpoint['rank_states']`` (one gather per
      save); resuming on the same number of ranks gives each rank its own, so
      the resumed run is the uninterrupted one, bit for bit.

    Fires ``before_train`` (cleanup), ``after_train_iter`` /
    ``after_train_epoch`` / ``after_val_epoch`` (saves, as mmengine's),
    ``before_save_checkpoint`` and ``after_load_checkpoint``.

    Args:
        allow_world_size_change (bool): Resume a checkpoint trained on another
            number of ranks (with a log line saying the continuation is not
            equivalent). Default: False.
        *args, **kwargs: ``CheckpointHook``'s arguments.
    """

    def __init__(self, *args, allow_world_size_change: bool = False,
                 **kwargs):
        super().__init__(*args, **kwargs)
        self.allow_world_size_change = allow_world_size_change
        self._rank_states: Optional[list] = None

    # ---------------------------------------------------------------- start
    def before_train(self, runner) -> None:
        super().before_train(runner)
        if is_main_process():
            folders = {self.out_dir, runner.work_dir}
            for folder in sorted(f for f in folders if isinstance(f, str)):
                self._remove_incomplete_saves(folder)

    def _remove_incomplete_saves(self, folder: str) -> None:
        if not isinstance(self.file_backend, LocalBackend) or \
                not osp.isdir(folder):
            return
        for name in sorted(os.listdir(folder)):
            target = temp_target(name)
            if target is None:
                continue
            path = osp.join(folder, name)
            os.remove(path)
            kept = osp.join(folder, target)
            print_log(
                f'removed {path}: the incomplete write of {target} by a '
                'process that was killed while saving; ' +
                (f'{kept} is the complete previous version'
                 if osp.exists(kept) else f'{target} was never completed'),
                logger='current')

    # ----------------------------------------------------------------- save
    def _save_checkpoint_with_step(self, runner, step, meta) -> None:
        self._gather_rank_states(runner)
        previous = runner.message_hub.get_info('last_ckpt')
        drop = None
        if self.max_keep_ckpts > 0 and not (
                self.keep_ckpt_ids and self.keep_ckpt_ids[-1] == step):
            if len(self.keep_ckpt_ids) == self.max_keep_ckpts:
                drop = self.keep_ckpt_ids.popleft()
            self.keep_ckpt_ids.append(step)
            runner.message_hub.update_info('keep_ckpt_ids',
                                           list(self.keep_ckpt_ids))
        filename = self.filename_tmpl.format(step)
        self.last_ckpt = self.file_backend.join_path(self.out_dir, filename)
        runner.message_hub.update_info('last_ckpt', self.last_ckpt)

        error = None
        try:
            runner.save_checkpoint(
                self.out_dir,
                filename,
                self.file_client_args,
                save_optimizer=self.save_optimizer,
                save_param_scheduler=self.save_param_scheduler,
                meta=meta,
                by_epoch=self.by_epoch,
                backend_args=self.backend_args,
                **self.args)
            if is_main_process():
                atomic_write(osp.join(runner.work_dir, 'last_checkpoint'),
                             str(self.last_ckpt).encode())
        except OSError as e:
            error = e
        finally:
            self._rank_states = None
        if not rank0_ok(error is None):
            raise CheckpointSaveError(
                self._failure(self.last_ckpt, step, previous, error)) from error
        if drop is not None and is_main_process():
            self._remove(
                self.file_backend.join_path(self.out_dir,
                                            self.filename_tmpl.format(drop)))

    def _save_best_checkpoint(self, runner, metrics) -> None:
        # mmengine removes the previous best before saving the new one:
        # defer the removals until the save returned. (Only rank 0 writes
        # here: a failure stops rank 0 with one line, the other ranks then
        # lose rank 0.)
        if not self.save_best:
            return
        previous = getattr(self, 'best_ckpt_path', None)
        try:
            with self._deferred_removals():
                super()._save_best_checkpoint(runner, metrics)
        except OSError as e:
            path = getattr(self, 'best_ckpt_path', None) or 'the best checkpoint'
            raise CheckpointSaveError(
                self._failure(path, runner.iter, previous, e)) from e

    @contextlib.contextmanager
    def _deferred_removals(self):
        backend, removals = self.file_backend, []

        class _Deferring:
            def __getattr__(self, name):
                return getattr(backend, name)

            def remove(self, path):
                removals.append(path)

            def rmtree(self, path):
                removals.append(path)

        self.file_backend = _Deferring()
        try:
            yield
        finally:
            self.file_backend = backend
        for path in removals:  # only reached when the save succeeded
            self._remove(path)

    def _remove(self, path: str) -> None:
        try:
            if self.file_backend.isfile(path):
                self.file_backend.remove(path)
            elif self.file_backend.isdir(path):
                self.file_backend.rmtree(path)
        except OSError as e:
            print_log(f'could not remove old checkpoint {path}: {e}',
                      logger='current')

    @staticmethod
    def _failure(path, step, previous, error) -> str:
        rank, _ = get_dist_info()
        if error is None:  # another rank's save failed
            what = f'rank 0 could not write checkpoint {path}'
        else:
            reason = error.strerror or str(error)
            code = errno.errorcode.get(error.errno or -1)
            what = f'cannot write checkpoint {path} ({reason}' + \
                (f', {code})' if code else ')')
        kept = f'the previous checkpoint {previous} is intact' if previous \
            else 'no earlier checkpoint exists'
        return (f'{what} at iteration {step}; training stopped, {kept}. Free '
                'space or fix the disk, then continue with --resume')

    # ------------------------------------------------- per-rank state, meta
    def _gather_rank_states(self, runner) -> None:
        import torch.distributed as dist
        self._rank_states = None
        rank, world_size = get_dist_info()
        if world_size == 1:
            return
        model = runner.model.module if is_model_wrapper(runner.model) \
            else runner.model
        local = dict(
            buffers={k: v.detach().cpu() for k, v in model.named_buffers()},
            random_state=get_random_state())
        gathered: Optional[List] = [None] * world_size if rank == 0 else None
        dist.gather_object(local, gathered, dst=0)
        self._rank_states = gathered

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        checkpoint.setdefault('meta', {})['world_size'] = runner.world_size
        if self._rank_states is not None:
            checkpoint[RANK_STATES_KEY] = self._rank_states

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        if not getattr(runner, '_resume', False):
            checkpoint.pop(RANK_STATES_KEY, None)  # weights only (load_from)
            return
        saved = (checkpoint.get('meta') or {}).get('world_size')
        if saved is not None and saved != runner.world_size:
            hub = checkpoint.get('message_hub') or {}
            path = (hub.get('runtime_info') or {}).get('last_ckpt') or \
                'the checkpoint'
            if not self.allow_world_size_change:
                raise UsageError(world_size_message(path, saved,
                                                    runner.world_size))
            print_log(
                f'resuming a checkpoint of {saved} ranks on '
                f'{runner.world_size} (allow_world_size_change): not '
                'equivalent to the uninterrupted run (global batch, data '
                "order; every rank starts from rank 0's buffers and RNG "
                'states)',
                logger='current')
            checkpoint.pop(RANK_STATES_KEY, None)
            return
        states = checkpoint.get(RANK_STATES_KEY)
        if states and len(states) == runner.world_size:
            state_dict = checkpoint.get('state_dict', {})
            for key, value in states[runner.rank]['buffers'].items():
                if key in state_dict:
                    state_dict[key] = value
