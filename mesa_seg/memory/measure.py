"""Measure one config's training memory and speed, in the current process.

A synthetic batch at the config's crop size goes through the model's own
``data_preprocessor`` and ``train_step`` with the config's optimizer wrapper
(forward, backward, optimizer step), exactly as mmengine's training loop calls
it. Call :func:`measure` in a fresh process per config (the tool does): CPU
figures count every tensor allocated since the process started measuring, and
CUDA peaks and allocator caches must not carry over from another model.

Order of a full measurement:

1. build model and optimizer (the config with ``strategy`` applied, see
   :mod:`mesa_seg.strategies`; initial weights written or loaded when asked),
   re-seed, ``warmup`` steps (optimizer state, Mesa ranges, cuDNN algorithm
   choice settle; the first one optionally captured: gradients and decode-head
   output, see :class:`StepCapture`) — on CPU with the allocator traced (see
   :class:`~mesa_seg.memory.meters.CPUAllocatorTrace`), for the absolute level;
2. ``steps`` timed steps (CUDA: the peak is ``max_memory_allocated`` over
   them), with glibc's default allocator settings, as in training; then glibc
   is set to give freed memory back (:func:`~mesa_seg.memory.meters.malloc_for_rss`);
3. CPU: one more step with the allocator traced, for the peak;
4. one step with peak RSS and RSS growth read around it (the heap trimmed
   first);
5. one audited forward (no backward) for the activation breakdown;
6. with ``compare_to``: the captured step against a reference run's
   (:func:`compare_captures`).
"""
from __future__ import annotations

import contextlib
import math
import os
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from .breakdown import activation_breakdown
from .meters import (CPUAllocatorTrace, malloc_for_rss, peak_rss_bytes, reset_peak_rss,
                     rss_bytes, trim_heap)

__all__ = ['RunSpec', 'measure', 'load_cfg', 'crop_size_of', 'build_training',
           'synthetic_batch', 'save_initial_weights', 'load_initial_weights',
           'StepCapture', 'compare_captures']


@dataclass
class RunSpec:
    """What to measure (JSON-serializable: it crosses the process boundary).

    Args:
        config (str): config file.
        batch (int): images per step. Default: 2.
        size (tuple[int, int], optional): ``(H, W)``; None = the config's crop
            size. Default: None.
        steps (int): timed training steps. Default: 3.
        warmup (int): untimed steps first, at least 1 (the first step creates the
            optimizer state; after it every step starts and ends at the same
            memory level). Default: 1.
        device (str): 'cpu' or 'cuda'. Default: 'cpu'.
        cfg_options (dict, optional): merged into the config. Default: None.
        threads (int, optional): ``torch.set_num_threads``. Default: None.
        seed (int): weights and synthetic batch. Default: 0.
        peak_only (bool): measure the peak memory of one step and nothing else
            (the batch sweep's probes). Default: False.
        warmup_batch (int, optional): batch of the warm-up steps; None = ``batch``.
            The CPU batch sweep warms up at the main run's (small) batch: the CPU
            allocator keeps no cache and the state a warm-up creates (optimizer
            state, Mesa ranges) does not depend on the batch size. Default: None.
        strategy (str, optional): a :data:`mesa_seg.strategies.STRATEGIES` name
            applied to the config before it is built. Default: None (as is).
        weights_out (str, optional): write the model's initial weights (after
            ``init_weights()``, before any step) to this file. Default: None.
        weights_in (str, optional): load initial weights from this file (written
            by ``weights_out`` of another run): the keys must match up to Mesa's
            quantizer buffers. Default: None.
        capture_out (str, optional): write what the first warm-up step computed
            (every parameter's gradient, the decode head's output) to this file.
            Default: None.
        compare_to (str, optional): a ``capture_out`` file of a reference run:
            the result gets ``grad_cosine`` and ``forward_exact`` against it.
            Default: None.
    """
    config: str
    batch: int = 2
    size: Optional[Tuple[int, int]] = None
    steps: int = 3
    warmup: int = 1
    device: str = 'cpu'
    cfg_options: Optional[dict] = None
    threads: Optional[int] = None
    seed: int = 0
    peak_only: bool = False
    warmup_batch: Optional[int] = None
    strategy: Optional[str] = None
    weights_out: Optional[str] = None
    weights_in: Optional[str] = None
    capture_out: Optional[str] = None
    compare_to: Optional[str] = None

    def __post_init__(self):
        if self.size is not None:
            self.size = tuple(int(s) for s in self.size)
        if min(self.batch, self.steps, self.warmup) < 1:
            raise ValueError(f'batch, steps and warmup must be >= 1, got {self}')
        if self.device not in ('cpu', 'cuda'):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {self.device!r}")


# ---------------------------------------------------------------- config, model
def crop_size_of(cfg) -> Optional[Tuple[int, int]]:
    """The training crop size a config declares: ``crop_size``, the data
    preprocessor's ``size``, or the train pipeline's ``RandomCrop``."""
    candidates = [cfg.get('crop_size'),
                  (cfg.get('model', {}).get('data_preprocessor') or {}).get('size')]
    dataset = (cfg.get('train_dataloader') or {}).get('dataset') or {}
    for t in dataset.get('pipeline') or cfg.get('train_pipeline') or []:
        if t.get('type') == 'RandomCrop':
            candidates.append(t.get('crop_size'))
    for c in candidates:
        if c is not None:
            return (int(c[0]), int(c[1]))
    return None


def load_cfg(spec: RunSpec):
    """Load the config for a single-process run on ``spec.device``; returns
    ``(cfg, (H, W))``."""
    from mmengine.utils import import_modules_from_strings

    from .. import compat
    from ..runner import load_config, prepare_cfg
    from ..setup_env import register_all_modules
    from ..strategies import apply_strategy
    register_all_modules(init_default_scope=False)
    cfg = load_config(spec.config, spec.cfg_options)
    if cfg.get('custom_imports'):
        import_modules_from_strings(**cfg['custom_imports'])
    if spec.strategy:
        apply_strategy(cfg, spec.strategy)
    prepare_cfg(cfg)
    compat.sync_bn_cfg_to_bn(cfg.get('model'))  # one process: SyncBN has nothing to sync
    size = spec.size or crop_size_of(cfg)
    if size is None:
        raise ValueError(f'{spec.config} declares no crop size (crop_size, '
                         'data_preprocessor.size or RandomCrop): pass --size H W')
    if cfg.model.get('data_preprocessor') is not None:
        cfg.model.data_preprocessor.size = tuple(size)
    return cfg, tuple(size)


def input_channels(cfg) -> int:
    """Image channels the config's data preprocessor normalizes (3 without one)."""
    return len((cfg.model.get('data_preprocessor') or {}).get('mean') or [0] * 3)


def build_training(cfg, device: str):
    """Model (training mode, on ``device``) and optimizer wrapper, as mmengine's
    Runner builds them."""
    from mmengine.optim import build_optim_wrapper
    from mmengine.registry import init_default_scope
    from mmseg.registry import MODELS
    init_default_scope(cfg.get('default_scope', 'mmseg'))
    model = MODELS.build(cfg.model)
    model.init_weights()
    model.to(device).train()
    return model, build_optim_wrapper(model, cfg.optim_wrapper)


def synthetic_batch(model: nn.Module, batch: int, size: Tuple[int, int], seed: int = 0,
                    channels: int = 3) -> dict:
    """A dataloader-style batch: uint8 images and random label maps over the
    decode head's classes, as ``PackSegInputs`` produces them."""
    from mmengine.structures import PixelData
    from mmseg.structures import SegDataSample
    h, w = size
    num_classes = model.decode_head.num_classes
    g = torch.Generator().manual_seed(seed)
    inputs, samples = [], []
    for _ in range(batch):
        inputs.append(torch.randint(0, 256, (channels, h, w), dtype=torch.uint8, generator=g))
        sample = SegDataSample(metainfo=dict(img_shape=(h, w), ori_shape=(h, w),
                                             pad_shape=(h, w)))
        sample.gt_sem_seg = PixelData(
            data=torch.randint(0, num_classes, (1, h, w), dtype=torch.int64, generator=g))
        samples.append(sample)
    return dict(inputs=inputs, data_samples=samples)


# ------------------------------------------------- same weights, same step
def save_initial_weights(model: nn.Module, path: str) -> None:
    """Write ``model``'s state dict (on CPU) to ``path``."""
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, path)


def load_initial_weights(model: nn.Module, path: str) -> Dict:
    """Load weights written by :func:`save_initial_weights` into ``model``.

    A Mesa model and its full-precision twin have the same keys up to Mesa's
    quantizer buffers (running ranges: they initialise from the first batch);
    any other difference raises
    :class:`~mesa_seg.errors.CheckpointMismatchError`. Returns how many of the
    file's tensors were loaded and which quantizer buffers were absent or dropped.
    """
    from ..models.checkpoint import match_state_dict
    state = torch.load(path, map_location='cpu', weights_only=True)
    extra, absent = match_state_dict(model, state)
    for key in extra:
        del state[key]
    missing, unexpected = model.load_state_dict(state, strict=False)
    allowed = set(absent)
    wrong = [k for k in missing if k not in allowed and not k.endswith('num_batches_tracked')]
    if wrong or unexpected:  # match_state_dict let something through: never silently
        raise RuntimeError(f'initial weights from {path} do not fit: missing {wrong}, '
                           f'unexpected {unexpected}')
    return dict(source=path, loaded=len(state), quantizer_buffers_absent=len(absent),
                quantizer_buffers_dropped=len(extra))


class StepCapture:
    """Records what one training step computes, for comparing strategies:
    every parameter's gradient as the optimizer wrapper's ``step`` receives it
    (divided by the AMP loss scale, if any) and the decode head's output.

    mmseg calls ``decode_head.forward`` from ``decode_head.loss``, not through
    ``__call__`` (a forward hook would never fire), so the method is wrapped on
    the instance for the duration of the ``with`` block; so is the wrapper's
    ``step``. Copies go to the CPU.
    """

    def __init__(self, model: nn.Module, optim_wrapper):
        self.model, self.optim_wrapper = model, optim_wrapper
        self.grads: Dict[str, Optional[torch.Tensor]] = {}
        self.decode_head: Optional[torch.Tensor] = None
        self.grad_scale: Optional[float] = None

    def __enter__(self) -> 'StepCapture':
        head, wrapper = self.model.decode_head, self.optim_wrapper
        forward, step = head.forward, wrapper.step

        def head_forward(*args, **kwargs):
            out = forward(*args, **kwargs)
            if self.decode_head is None:  # the first call: the training forward
                self.decode_head = out.detach().to('cpu', copy=True)
            return out

        def wrapper_step(*args, **kwargs):
            scaler = getattr(wrapper, 'loss_scaler', None)
            scale = float(scaler.get_scale()) if scaler is not None and \
                scaler.is_enabled() else 1.0
            self.grad_scale = scale
            for name, p in self.model.named_parameters():
                g = p.grad
                self.grads[name] = None if g is None else \
                    (g.detach().to('cpu', torch.float64, copy=True) / scale).float()
            return step(*args, **kwargs)

        object.__setattr__(head, 'forward', head_forward)
        object.__setattr__(wrapper, 'step', wrapper_step)
        return self

    def __exit__(self, *exc) -> None:
        self.model.decode_head.__dict__.pop('forward', None)
        self.optim_wrapper.__dict__.pop('step', None)

    def save(self, path: str) -> None:
        if self.decode_head is None or not self.grads:
            raise RuntimeError('the captured step ran no decode head forward or no '
                               'optimizer step')
        torch.save(dict(grads=self.grads, decode_head=self.decode_head,
                        grad_scale=self.grad_scale), path)
        self.grads, self.decode_head = {}, None


def compare_captures(path: str, reference_path: str) -> Dict:
    """Compare a :class:`StepCapture` file with a reference run's.

    Returns:
        dict: ``grad_cosine``: cosine similarity of all parameter gradients
        concatenated in parameter-name order (float64; a parameter without a
        gradient counts as zeros; None if not finite); ``grad_exact``: every
        gradient bit-identical to the reference's; ``forward_exact``:
        ``torch.equal`` of the decode head's outputs, dtype included;
        ``forward_dtype``, ``reference_forward_dtype``, ``forward_max_abs_diff``
        (None when the shapes differ), ``grad_params`` (compared), ``grad_params_unmatched``
        (names in only one of the two runs: counted as zeros on the other side).
    """
    own = torch.load(path, map_location='cpu', weights_only=True)
    ref = torch.load(reference_path, map_location='cpu', weights_only=True)
    a, b = own['grads'], ref['grads']
    names = sorted(set(a) | set(b))
    dot = norm_a = norm_b = torch.zeros((), dtype=torch.float64)
    unmatched, exact = 0, True
    for name in names:
        ga, gb = a.get(name), b.get(name)
        if name not in a or name not in b:
            unmatched += 1
        exact = exact and (ga is None) == (gb is None) and (
            ga is None or (ga.dtype == gb.dtype and torch.equal(ga, gb)))
        ga = None if ga is None else ga.double().flatten()
        gb = None if gb is None else gb.double().flatten()
        if ga is not None and gb is not None:
            if ga.shape != gb.shape:
                raise RuntimeError(f'gradient of {name} has {ga.numel()} values here, '
                                   f'{gb.numel()} in the reference run')
            dot = dot + (ga * gb).sum()
        if ga is not None:
            norm_a = norm_a + ga.square().sum()
        if gb is not None:
            norm_b = norm_b + gb.square().sum()
    cosine = float(dot / (norm_a.sqrt() * norm_b.sqrt()))
    ya, yb = own['decode_head'], ref['decode_head']
    same_shape = ya.shape == yb.shape
    diff = float((ya.double() - yb.double()).abs().max()) if same_shape and ya.numel() else None
    return dict(
        grad_cosine=cosine if math.isfinite(cosine) else None, grad_exact=bool(exact),
        grad_params=len(names), grad_params_unmatched=unmatched,
        forward_exact=bool(ya.dtype == yb.dtype and torch.equal(ya, yb)),
        forward_dtype=str(ya.dtype).replace('torch.', ''),
        reference_forward_dtype=str(yb.dtype).replace('torch.', ''),
        forward_max_abs_diff=diff if diff is None or math.isfinite(diff) else None)


def _unique_bytes(tensors) -> int:
    seen = {}
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.numel():
            s = t.untyped_storage()
            seen[(t.device, s.data_ptr())] = s.nbytes()
    return sum(seen.values())


def _optimizer_state(optim_wrapper) -> List[torch.Tensor]:
    return [v for state in optim_wrapper.optimizer.state.values()
            for v in state.values() if isinstance(v, torch.Tensor)]


# ------------------------------------------------------------------ measuring
class _Clock:
    def __init__(self, device: str):
        self.cuda = device == 'cuda'

    def __call__(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()


def measure(spec: RunSpec, progress: Callable[[str], None] = lambda phase: None) -> Dict:
    """Measure ``spec`` in this process; returns a JSON-serializable dict.

    ``progress(phase)`` is called after each unit of work (build, each step,
    the audit); :func:`progress_units` says how many there are.

    On CUDA an out-of-memory step ends the measurement with
    ``{'oom': True, ...}`` instead of raising. With ``compare_to`` (and no
    ``capture_out``) this run's own capture goes to a temporary file.
    """
    own = None
    if spec.compare_to and not spec.capture_out and not spec.peak_only:
        fd, own = tempfile.mkstemp(prefix='mesa-capture-', suffix='.pt')
        os.close(fd)
    try:
        result = _measure(spec, own, progress)
    finally:
        if own and os.path.exists(own):
            os.remove(own)
    return result


def _measure(spec: RunSpec, own_capture: Optional[str],
             progress: Callable[[str], None]) -> Dict:
    if spec.threads:
        torch.set_num_threads(spec.threads)
    torch.manual_seed(spec.seed)
    cuda = spec.device == 'cuda'
    if cuda and not torch.cuda.is_available():
        raise RuntimeError('--device cuda: no CUDA device is available')
    cfg, size = load_cfg(spec)
    channels = input_channels(cfg)
    result: Dict = dict(spec=asdict(spec), size=list(size), device=spec.device,
                        torch_threads=torch.get_num_threads(), oom=False)
    clock = _Clock(spec.device)
    # CPU: trace the allocator from before the build (absolute levels), time
    # the steps untraced, then trace one more step for the peak.
    setup = CPUAllocatorTrace() if not cuda else contextlib.nullcontext()
    capture_path = None if spec.peak_only else (spec.capture_out or own_capture)
    try:
        with setup:
            model, optim_wrapper = build_training(cfg, spec.device)
            if spec.weights_out:
                save_initial_weights(model, spec.weights_out)
            if spec.weights_in:
                result['weights'] = load_initial_weights(model, spec.weights_in)
            progress('build')
            data = synthetic_batch(model, spec.batch, size, spec.seed, channels)
            warm = data if spec.warmup_batch in (None, spec.batch) else \
                synthetic_batch(model, spec.warmup_batch, size, spec.seed, channels)
            # Building Mesa layers draws from the RNG: re-seed, so that every
            # strategy's first step sees the same dropout and drop-path draws.
            torch.manual_seed(spec.seed)
            if cuda:
                torch.cuda.manual_seed_all(spec.seed)
            for i in range(spec.warmup):
                if i == 0 and capture_path:
                    with StepCapture(model, optim_wrapper) as capture:
                        model.train_step(warm, optim_wrapper)
                    capture.save(capture_path)  # to a file: nothing stays resident
                    del capture
                else:
                    model.train_step(warm, optim_wrapper)
                progress('warm-up')
            del warm
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            result['step_start'] = torch.cuda.memory_allocated()
        times, cpu_times = [], []
        # A CPU probe needs only the traced step; a CUDA probe's peak is one step's.
        timed = (1 if cuda else 0) if spec.peak_only else spec.steps
        for _ in range(timed):
            t0, c0 = clock(), time.process_time()
            log_vars = model.train_step(data, optim_wrapper)
            times.append(clock() - t0)
            cpu_times.append(time.process_time() - c0)
            progress('step')
        if not spec.peak_only:
            # From here on, freed memory goes back to the kernel; the traced step
            # (CPU) lets the heap settle under that setting before RSS is read.
            malloc_for_rss()
        if cuda:
            result.update(peak_source='torch.cuda.max_memory_allocated',
                          peak=torch.cuda.max_memory_allocated(),
                          peak_reserved=torch.cuda.max_memory_reserved())
        else:
            with CPUAllocatorTrace() as trace:
                with trace.window('step'):
                    log_vars = model.train_step(data, optim_wrapper)
            progress('traced step')
            # Steady state: every step ends at the level it started from, so the
            # setup trace's final level is where this step starts.
            start, peak = trace.levels('step')
            result.update(peak_source='CPU allocator events (torch.profiler, profile_memory)',
                          step_start=setup.end_level + start, peak=setup.end_level + peak,
                          step_drift=trace.end_level - start, peak_at=trace.peak_ops('step'))
        if spec.peak_only:
            return result
        trim_heap()
        rss0 = rss_bytes()
        reset_peak_rss()
        log_vars = model.train_step(data, optim_wrapper)
        peak_rss = peak_rss_bytes()
        progress('rss step')
    except torch.OutOfMemoryError:
        if not cuda:
            raise
        result.update(oom=True, peak=None)
        return result
    result.update(
        step_time=dict(median=statistics.median(times), all=times),
        # CPU seconds of all this process's threads: less sensitive than wall
        # time to other processes sharing the machine
        step_cpu_time=dict(median=statistics.median(cpu_times), all=cpu_times),
        peak_rss=peak_rss, rss_step_growth=peak_rss - rss0,
        params=_unique_bytes(model.parameters()),
        buffers=_unique_bytes(model.buffers()),
        optimizer_state=_unique_bytes(_optimizer_state(optim_wrapper)),
        loss=float(log_vars['loss']),
        model=_describe(model, optim_wrapper))

    def forward_loss():  # BaseModel.train_step up to the loss: no backward
        with optim_wrapper.optim_context(model):
            batch = model.data_preprocessor(data, True)
            losses = model._run_forward(batch, mode='loss')
        loss, _ = model.parse_losses(losses)
        return loss

    result['activation'] = activation_breakdown(model, forward_loss)
    progress('audit')
    if spec.compare_to and capture_path and os.path.exists(spec.compare_to):
        result.update(compare_captures(capture_path, spec.compare_to))
    return result


def progress_units(spec: RunSpec) -> int:
    """How many times :func:`measure` calls ``progress`` for ``spec``."""
    cpu = spec.device == 'cpu'
    if spec.peak_only:
        return 1 + spec.warmup + 1
    return 1 + spec.warmup + spec.steps + int(cpu) + 1 + 1  # ... traced, rss step, audit


def _loss_label(model: nn.Module) -> str:
    """Which loss the heads compute: the fused resize + CE (its logits kept in
    8 bits or not) or mmseg's; named per head when they differ."""
    from ..models.losses import FusedLossHeadMixin
    from ..models.segmentors import loss_heads
    from ..strategies import LOSS_FUSED, LOSS_FUSED_8BIT, LOSS_MMSEG
    labels = [LOSS_MMSEG if not isinstance(h, FusedLossHeadMixin)
              else LOSS_FUSED_8BIT if h.logits_in_8bit else LOSS_FUSED
              for h in loss_heads(model)]
    if len(set(labels)) == 1:
        return labels[0]
    names = ['decode head'] + (['auxiliary head'] if len(labels) == 2 else
                               [f'auxiliary head {i}' for i in range(len(labels) - 1)])
    return '; '.join(f'{name}: {label}' for name, label in zip(names, labels))


def _checkpointing(model: nn.Module):
    """The backbone's activation checkpointing: False, True or 'selective'
    (from the ``with_cp`` attributes of its modules)."""
    backbone = getattr(model, 'backbone', None)
    modes = {getattr(m, 'with_cp') for m in (backbone.modules() if backbone else [])
             if isinstance(getattr(m, 'with_cp', None), (bool, str))}
    if 'selective' in modes:
        return 'selective'
    return True in modes


def _precision(optim_wrapper) -> str:
    name = type(optim_wrapper).__name__
    dtype = getattr(optim_wrapper, 'cast_dtype', None)
    if name == 'OptimWrapper':
        return 'fp32'
    if name == 'AmpOptimWrapper':
        dtype = str(dtype or 'float16').replace('torch.', '')
        scaler = getattr(optim_wrapper, 'loss_scaler', None)
        dynamic = scaler is not None and getattr(optim_wrapper, '_scale_update_param',
                                                  None) is None
        return f"{dtype} AMP{', dynamic loss scale' if dynamic else ''}"
    return f"{str(dtype or 'bfloat16').replace('torch.', '')} AMP (CPU)" \
        if 'CPUAmp' in name else name


def _describe(model: nn.Module, optim_wrapper) -> Dict:
    from ..mesa import mesa_modules

    def type_of(name):
        part = getattr(model, name, None)
        if isinstance(part, nn.ModuleList):
            return [type(p).__name__ for p in part]
        return None if part is None else type(part).__name__

    return dict(
        segmentor=type(model).__name__,
        backbone=type_of('backbone'), neck=type_of('neck'),
        decode_head=type_of('decode_head'), auxiliary_head=type_of('auxiliary_head'),
        params=sum(p.numel() for p in model.parameters()),
        mesa_layers=len(mesa_modules(model)),
        optim_wrapper=type(optim_wrapper).__name__,
        optimizer=type(optim_wrapper.optimizer).__name__,
        loss=_loss_label(model),
        checkpointing=_checkpointing(model),
        precision=_precision(optim_wrapper),
    )
