"""RandomStateHook: RNG states in checkpoints, so ``--resume`` is exact.

mmengine's checkpoints hold weights, buffers (so Mesa's running ranges),
optimizer, schedulers and the iteration, but no RNG state, while Dropout, drop
path, stochastic rounding and data augmentation draw from the global RNGs.
"""
from __future__ import annotations

import random
from typing import Mapping, Optional, Tuple

import numpy as np
import torch
from mmengine.dist import get_dist_info
from mmengine.hooks import Hook
from mmengine.logging import print_log
from mmengine.registry import HOOKS

__all__ = [
    'RANDOM_STATE_KEY', 'RANK_STATES_KEY', 'get_random_state',
    'set_random_state', 'RandomStateHook'
]

RANDOM_STATE_KEY = 'random_state'  # top-level key in checkpoints
#: Top-level checkpoint key: per rank, its buffers and RNG states (written by
#: SafeCheckpointHook in distributed runs).
RANK_STATES_KEY = 'rank_states'


def get_random_state() -> dict:
    """The python, numpy and torch (CPU and CUDA) RNG states, as types that
    ``torch.load(weights_only=True)`` accepts."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = dict(
        python=random.getstate(),
        numpy=(name, torch.from_numpy(keys.astype(np.int64)), int(pos),
               int(has_gauss), float(gauss)),
        torch=torch.get_rng_state())
    if torch.cuda.is_available():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def set_random_state(state: Mapping, host: bool = True) -> None:
    """Restore :func:`get_random_state`'s states.

    Args:
        state (Mapping): As returned by :func:`get_random_state`.
        host (bool): Also restore the python and numpy states (torch's
            always). Default: True.
    """
    if host:
        python = state['python']
        # weights_only loading may turn the inner tuple into a list
        random.setstate((python[0], tuple(python[1]), python[2]))
        name, keys, pos, has_gauss, gauss = state['numpy']
        np.random.set_state(
            (name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state['torch'])
    cuda = state.get('cuda')
    if cuda is not None and torch.cuda.is_available() and \
            len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


class _RestoreAfterSkip:
    """Wraps a loop's dataloader iterator; after ``skip`` batches (the ones
    mmengine re-reads to fast-forward a resumed run) it restores the RNG
    states and puts the plain iterator back."""

    def __init__(self, loop, skip: int, state: Mapping, host: bool):
        self._loop, self._it = loop, loop.dataloader_iterator
        self._left, self._state, self._host = skip, state, host

    def __iter__(self):
        return self

    def __next__(self):
        batch = next(self._it)
        self._left -= 1
        if self._left == 0:
            set_random_state(self._state, self._host)
            self._loop.dataloader_iterator = self._it
        return batch


@HOOKS.register_module()
class RandomStateHook(Hook):
    """Saves the RNG states in every checkpoint and restores them on resume,
    so a resumed run continues exactly as the uninterrupted run would (same
    stochastic rounding, dropout and data augmentation).

    Fires ``before_save_checkpoint`` (stores the states under
    ``checkpoint['random_state']``, i.e. after the last hook of an iteration),
    ``after_load_checkpoint`` (keeps them) and the ``before_train_epoch`` of a
    resumed run (restores them). On resume mmengine re-reads the ``iter``
    batches already trained to fast-forward the dataloader, which replays the
    augmentation RNG of the pipeline (or of the workers); the states are
    restored right after that replay, i.e. at the same point of the data
    stream where they were taken. A checkpoint loaded as weights
    (``load_from`` without resume) leaves the RNGs alone.

    In distributed runs checkpoints are written by rank 0. When the
    checkpoint holds every rank's states (``checkpoint['rank_states']``,
    written by :class:`SafeCheckpointHook`) and the run has as many ranks as
    the one that wrote it, each rank restores its own. Otherwise every rank
    restores rank 0's torch state (the same on all ranks unless
    ``randomness.diff_rank_seed``, in which case it logs one line saying the
    resumed run is not bit-identical); python/numpy states, which drive each
    rank's own data pipeline, are restored on rank 0 only and come from the
    replay on the others.
    """

    priority = 'VERY_LOW'

    def __init__(self):
        self._pending: Optional[Tuple[Mapping, int, bool]] = None

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        checkpoint[RANDOM_STATE_KEY] = get_random_state()

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        state = checkpoint.get(RANDOM_STATE_KEY)
        meta = checkpoint.get('meta') or {}
        rank, world_size = get_dist_info()
        states = checkpoint.get(RANK_STATES_KEY)
        own = bool(states) and len(states) == world_size
        if own:
            state = states[rank]['random_state']
        self._pending = None if state is None else (state, meta.get('iter'),
                                                    own)

    def before_train_epoch(self, runner) -> None:
        if self._pending is None:
            return
        (state, saved_iter, own), self._pending = self._pending, None
        if runner.iter == 0 or runner.iter != saved_iter:
            return  # loaded as weights (load_from), not resumed
        rank, world_size = get_dist_info()
        if world_size > 1 and not own and \
                (runner.cfg.get('randomness') or {}).get('diff_rank_seed'):
            print_log(
                'RandomStateHook: with randomness.diff_rank_seed every rank '
                "resumes with rank 0's torch RNG state, so the resumed run "
                'is not bit-identical to an uninterrupted one.',
                logger='current')
        loop = runner.train_loop
        host = rank == 0 or own
        if getattr(loop, 'dataloader_iterator', None) is not None:
            # IterBasedTrainLoop: restore after its fast-forward of `iter`
            # batches, which follows this hook.
            loop.dataloader_iterator = _RestoreAfterSkip(
                loop, runner.iter, state, host)
        else:
            set_random_state(state, host)  # epoch-based: a fresh epoch starts
