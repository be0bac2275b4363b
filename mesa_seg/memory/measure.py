"""Measure one config's training memory and speed, in the current process.

A synthetic batch at the config's crop size goes through the model's own
``data_preprocessor`` and ``train_step`` with the config's optimizer wrapper
(forward, backward, optimizer step), exactly as mmengine's training loop calls
it. Call :func:`measure` in a fresh process per config (the tool does): CPU
figures count every tensor allocated since the process started measuring, and
CUDA peaks and allocator caches must not carry over from another model.

Order of a full measurement:

1. build model and optimizer, ``warmup`` steps (optimizer state, Mesa ranges,
   cuDNN algorithm choice settle) — on CPU with the allocator traced (see
   :class:`~mesa_seg.memory.meters.CPUAllocatorTrace`), for the absolute level;
2. ``steps`` timed steps (CUDA: the peak is ``max_memory_allocated`` over
   them), peak RSS and RSS growth read around each (the heap trimmed first);
3. CPU: one more step with the allocator traced, for the peak;
4. one audited forward (no backward) for the activation breakdown.
"""
from __future__ import annotations

import contextlib
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from .breakdown import activation_breakdown
from .meters import CPUAllocatorTrace, peak_rss_bytes, reset_peak_rss, rss_bytes, trim_heap

__all__ = ['RunSpec', 'measure', 'load_cfg', 'crop_size_of', 'build_training',
           'synthetic_batch']


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
    from ..apis import load_config, prepare_cfg
    cfg = load_config(spec.config, spec.cfg_options)
    if cfg.get('custom_imports'):
        import_modules_from_strings(**cfg['custom_imports'])
    prepare_cfg(cfg)
    compat.sync_bn_to_bn(cfg.get('model'))  # one process: SyncBN has nothing to sync
    size = spec.size or crop_size_of(cfg)
    if size is None:
        raise ValueError(f'{spec.config} declares no crop size (crop_size, '
                         'data_preprocessor.size or RandomCrop): pass --size H W')
    if cfg.model.get('data_preprocessor') is not None:
        cfg.model.data_preprocessor.size = tuple(size)
    return cfg, tuple(size)


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
    ``{'oom': True, ...}`` instead of raising.
    """
    if spec.threads:
        torch.set_num_threads(spec.threads)
    torch.manual_seed(spec.seed)
    cuda = spec.device == 'cuda'
    if cuda and not torch.cuda.is_available():
        raise RuntimeError('--device cuda: no CUDA device is available')
    cfg, size = load_cfg(spec)
    channels = len((cfg.model.get('data_preprocessor') or {}).get('mean') or [0] * 3)
    result: Dict = dict(spec=asdict(spec), size=list(size), device=spec.device,
                        torch_threads=torch.get_num_threads(), oom=False)
    clock = _Clock(spec.device)
    # CPU: trace the allocator from before the build (absolute levels), time
    # the steps untraced, then trace one more step for the peak.
    setup = CPUAllocatorTrace() if not cuda else contextlib.nullcontext()
    try:
        with setup:
            model, optim_wrapper = build_training(cfg, spec.device)
            progress('build')
            data = synthetic_batch(model, spec.batch, size, spec.seed, channels)
            warm = data if spec.warmup_batch in (None, spec.batch) else \
                synthetic_batch(model, spec.warmup_batch, size, spec.seed, channels)
            for _ in range(spec.warmup):
                model.train_step(warm, optim_wrapper)
                progress('warm-up')
            del warm
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            result['step_start'] = torch.cuda.memory_allocated()
        times, cpu_times, rss_peaks, rss_growth = [], [], [], []
        # A CPU probe needs only the traced step; a CUDA probe's peak is one step's.
        timed = (1 if cuda else 0) if spec.peak_only else spec.steps
        for _ in range(timed):
            trim_heap()
            rss0 = rss_bytes()
            reset_peak_rss()
            t0, c0 = clock(), time.process_time()
            log_vars = model.train_step(data, optim_wrapper)
            times.append(clock() - t0)
            cpu_times.append(time.process_time() - c0)
            rss_peaks.append(peak_rss_bytes())
            rss_growth.append(rss_peaks[-1] - rss0)
            progress('step')
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
        peak_rss=max(rss_peaks), rss_step_growth=max(rss_growth),
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
    return result


def progress_units(spec: RunSpec) -> int:
    """How many times :func:`measure` calls ``progress`` for ``spec``."""
    cpu = spec.device == 'cpu'
    if spec.peak_only:
        return 1 + spec.warmup + 1
    return 1 + spec.warmup + int(cpu) + spec.steps + 1


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
    )
