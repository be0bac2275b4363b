"""Training that survives faults: exact resume, safe checkpoints, loud failures.

What mmengine 0.10.7 leaves open, and the answer here:

- **Resume is not exact.** Checkpoints hold weights, buffers (so Mesa's running
  ranges), optimizer, schedulers and the iteration, but no RNG state, while
  Dropout, drop path and data augmentation draw from the global RNGs.
  :class:`RandomStateHook` stores the python/numpy/torch RNG states in every
  checkpoint and restores them on resume at the point where they were taken.
- **Checkpoints are written in place**, so a killed save leaves a truncated
  file under the final name. :func:`install_atomic_writes` (run on import)
  makes mmengine's local file backend write a temporary file and
  ``os.replace`` it.
- **Mismatched weights only warn** (``load_from``/resume load with
  ``strict=False``). :class:`CheckpointCompatHook` allows exactly the Mesa
  difference (quantizer buffers) and fails on anything else, listing the keys.
- **A NaN/Inf loss is stepped into the weights.** :func:`check_finite_loss`
  (called by ``MesaEncoderDecoder.parse_losses``) stops training before the
  backward pass and the optimizer step.
- **A label outside the class range** crashes the loss deep in a run (on CUDA
  as a device-side assert). :class:`LabelRangeHook` names the file first.

All hooks are on in ``configs/_base_/default_runtime.py``; the errors derive
from :class:`mesa_seg.apis.UsageError` (one line, exit 2 in ``tools/``) or are
:class:`NonFiniteLossError` (one line, exit 1).
"""
from __future__ import annotations

import os
import os.path as osp
import random
import re
import uuid
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from mmengine.dist import get_dist_info
from mmengine.fileio.backends import LocalBackend, register_backend
from mmengine.hooks import Hook
from mmengine.logging import MessageHub, print_log
from mmengine.model import is_model_wrapper
from mmengine.registry import HOOKS
from torch import nn

from .apis import UsageError
from .mesa import LAYER_TYPES, RunningRange

__all__ = [
    'CheckpointMismatchError', 'LabelError', 'NonFiniteLossError',
    'AtomicLocalBackend', 'install_atomic_writes', 'get_random_state',
    'set_random_state', 'RandomStateHook', 'match_state_dict',
    'CheckpointCompatHook', 'check_finite_loss', 'LabelRangeHook'
]

RANDOM_STATE_KEY = 'random_state'  # top-level key in checkpoints
_MAX_LISTED = 20  # keys listed in one error message


class CheckpointMismatchError(UsageError):
    """A checkpoint's weights do not fit the model (beyond Mesa's buffers)."""


class LabelError(UsageError):
    """A training label lies outside ``[0, num_classes)`` and is not ignored."""


class NonFiniteLossError(FloatingPointError):
    """The loss is NaN/Inf; raised before backward, so weights are intact."""


# ----------------------------------------------------------- atomic writes
class AtomicLocalBackend(LocalBackend):
    """mmengine's local backend, writing files atomically.

    ``put``/``put_text`` write a temporary file in the target folder, flush it
    to disk and ``os.replace`` it onto the target (atomic on POSIX and
    Windows). A save that dies half-way leaves at most a ``.*.tmp`` file that
    no loader looks for; the previous file of that name stays intact.
    """

    def put(self, obj: bytes, filepath) -> None:
        _atomic_write(str(filepath), obj)

    def put_text(self, obj: str, filepath, encoding: str = 'utf-8') -> None:
        _atomic_write(str(filepath), obj.encode(encoding))


def _atomic_write(path: str, data: bytes) -> None:
    folder, name = osp.split(osp.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = osp.join(folder, f'.{name}.{uuid.uuid4().hex[:8]}.tmp')
    # os.open, not mkstemp: the file gets the usual umask-based mode, not 0600
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, 'wb') as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if osp.exists(tmp):
            os.remove(tmp)
        raise


def install_atomic_writes() -> None:
    """Make mmengine's default local file backend :class:`AtomicLocalBackend`.

    Checkpoints (``Runner.save_checkpoint``), ``mmengine.dump`` and everything
    else written through ``mmengine.fileio`` to local paths then never leave a
    truncated file. Idempotent.
    """
    from mmengine.fileio import io as fileio_io
    register_backend('local', AtomicLocalBackend, force=True, prefixes='')
    # Drop plain LocalBackend instances cached before this ran.
    for key, backend in list(fileio_io.backend_instances.items()):
        if type(backend) is LocalBackend:
            del fileio_io.backend_instances[key]


# ------------------------------------------------------------ RNG states
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

    The states are taken when the checkpoint is written (after the last hook
    of an iteration). On resume mmengine re-reads the ``iter`` batches already
    trained to fast-forward the dataloader, which replays the augmentation
    RNG of the pipeline (or of the workers); the states are restored right
    after that replay, i.e. at the same point of the data stream where they
    were taken.

    In distributed runs checkpoints are written by rank 0: every rank restores
    rank 0's torch state (the same on all ranks unless
    ``randomness.diff_rank_seed``); python/numpy states, which drive each
    rank's own data pipeline, are restored on rank 0 only and come from the
    replay on the others.
    """

    priority = 'VERY_LOW'

    def __init__(self):
        self._pending: Optional[Tuple[Mapping, int]] = None

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        checkpoint[RANDOM_STATE_KEY] = get_random_state()

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        state = checkpoint.get(RANDOM_STATE_KEY)
        meta = checkpoint.get('meta') or {}
        self._pending = None if state is None else (state, meta.get('iter'))

    def before_train_epoch(self, runner) -> None:
        if self._pending is None:
            return
        (state, saved_iter), self._pending = self._pending, None
        if runner.iter == 0 or runner.iter != saved_iter:
            return  # loaded as weights (load_from), not resumed
        rank, world_size = get_dist_info()
        if world_size > 1 and \
                (runner.cfg.get('randomness') or {}).get('diff_rank_seed'):
            print_log(
                'RandomStateHook: with randomness.diff_rank_seed every rank '
                "resumes with rank 0's torch RNG state, so the resumed run "
                'is not bit-identical to an uninterrupted one.',
                logger='current')
        loop = runner.train_loop
        host = rank == 0
        if getattr(loop, 'dataloader_iterator', None) is not None:
            # IterBasedTrainLoop: restore after its fast-forward of `iter`
            # batches, which follows this hook.
            loop.dataloader_iterator = _RestoreAfterSkip(
                loop, runner.iter, state, host)
        else:
            set_random_state(state, host)  # epoch-based: a fresh epoch starts


# ---------------------------------------------------- checkpoint matching
# attribute names of the quantizers in Mesa layers ('quantizer', ...)
_QUANTIZER_NAMES = frozenset(
    name for _, mesa_cls in LAYER_TYPES.values() for name in mesa_cls._quantized)


def _is_quantizer_key(key: str) -> bool:
    """Whether ``key`` names a buffer of a Mesa quantizer (``<layer>.quantizer.
    running_min`` ...). Such buffers carry no weights; a layer the model runs
    in full precision (or functionally, like an attention matmul) ignores them.
    """
    parts = key.split('.')
    return len(parts) >= 3 and parts[-2] in _QUANTIZER_NAMES


def _quantizer_keys(model: nn.Module) -> set:
    return {
        f'{name}.{buf}' if name else buf
        for name, module in model.named_modules()
        if isinstance(module, RunningRange) for buf in module._buffers
    }


def _listing(what: str, keys: Sequence[str]) -> str:
    shown = ', '.join(keys[:_MAX_LISTED])
    more = f' ... and {len(keys) - _MAX_LISTED} more' \
        if len(keys) > _MAX_LISTED else ''
    return f'{len(keys)} {what}: {shown}{more}'


def match_state_dict(
    model: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    revise_keys: Sequence[Tuple[str, str]] = ((r'^module\.', ''), )
) -> Tuple[List[str], List[str]]:
    """Check that ``state_dict`` fits ``model`` up to Mesa's quantizer buffers.

    Allowed: missing quantizer buffers (a full-precision checkpoint loaded
    into a Mesa model: they initialise from the first training batch), extra
    quantizer buffers (a Mesa checkpoint loaded into a model without Mesa on
    those layers), missing BatchNorm ``num_batches_tracked`` (ignored by
    mmengine too).

    Args:
        model (nn.Module): The model (unwrapped from DDP).
        state_dict (Mapping): Checkpoint weights, keys as stored.
        revise_keys (Sequence[tuple[str, str]]): ``re.sub`` pairs applied to
            the stored keys before matching, as mmengine's loader does.
            Default: strip ``module.``.

    Returns:
        tuple[list[str], list[str]]: Extra quantizer keys *as stored* (to be
        dropped before loading) and the model's quantizer buffers the
        checkpoint lacks.

    Raises:
        CheckpointMismatchError: On any other missing or unexpected key or a
            shape mismatch; the message lists the keys.
    """
    revised: Dict[str, str] = {}
    for key in state_dict:
        new = key
        for pattern, repl in revise_keys:
            new = re.sub(pattern, repl, new)
        revised[new] = key
    expected = model.state_dict()
    quantizer_keys = _quantizer_keys(model)
    missing = [
        k for k in expected if k not in revised and k not in quantizer_keys
        and not k.endswith('num_batches_tracked')
    ]
    extra, unexpected = [], []
    for key in revised:
        if key not in expected:
            (extra if _is_quantizer_key(key) else unexpected).append(key)
    shapes = [
        f'{k} {tuple(state_dict[revised[k]].shape)} vs model '
        f'{tuple(expected[k].shape)}' for k in revised
        if k in expected and hasattr(state_dict[revised[k]], 'shape')
        and tuple(state_dict[revised[k]].shape) != tuple(expected[k].shape)
    ]
    problems = [
        _listing(what, keys)
        for what, keys in (('missing keys', missing),
                           ('unexpected keys', unexpected),
                           ('shape mismatches (checkpoint vs model)', shapes))
        if keys
    ]
    if problems:
        raise CheckpointMismatchError(
            'checkpoint does not fit the model (is it from another '
            'architecture or config?): ' + '; '.join(problems))
    absent = sorted(quantizer_keys - set(revised))
    return [revised[k] for k in extra], absent


@HOOKS.register_module()
class CheckpointCompatHook(Hook):
    """Checks every checkpoint the Runner loads (``load_from``, resume,
    ``tools/test.py``) with :func:`match_state_dict`: Mesa and full-precision
    checkpoints load into each other, with one log line; any other
    difference raises :class:`CheckpointMismatchError` listing the keys,
    instead of mmengine's warning.

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


# ------------------------------------------------------------- loss guard
def check_finite_loss(loss: torch.Tensor,
                      log_vars: Mapping[str, Union[torch.Tensor, float]]
                      ) -> None:
    """Raise :class:`NonFiniteLossError` if ``loss`` is NaN/Inf.

    Called on the parsed loss, before backward: the optimizer never steps a
    NaN into the weights, and the last checkpoint stays usable. Costs one
    host synchronisation per iteration (mmengine's logging takes one anyway).
    """
    if bool(torch.isfinite(loss).all()):
        return
    terms = ', '.join(f'{k}={float(torch.as_tensor(v).detach()):.4g}'
                      for k, v in log_vars.items() if 'loss' in k)
    it = MessageHub.get_current_instance().get_info('iter')
    where = f' at iteration {it + 1}' if it is not None else ''
    raise NonFiniteLossError(
        f'non-finite loss{where} ({terms}); training stopped before the '
        'optimizer step: parameters, optimizer state and checkpoints are '
        'intact. A NaN/Inf '
        'reached the forward pass (input data, learning rate too high, AMP '
        'overflow); Mesa keeps its running ranges unchanged on such batches '
        '(mesa_seg/mesa/observer.py). Fix the cause and continue with '
        '--resume.')


# ------------------------------------------------------- label range hook
@HOOKS.register_module()
class LabelRangeHook(Hook):
    """Checks each training batch's labels against the decode head's classes
    before the step, naming the annotation file of a bad label (the loss
    would fail with an index error, on CUDA a device-side assert)."""

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


install_atomic_writes()
