"""Stateless quantization primitives of Mesa (no modules, no state).

A tensor is compressed per *group*: it is viewed as ``(outer, groups, inner)``
(:func:`group_view`) and every group ``g`` has its own minimum ``lo[g]`` and range
``rng[g]``. The stored format is asymmetric unsigned 8-bit:

=================  =====================================================
quantize           ``q = clamp(floor((x - lo) * 255 / rng + u), 0, 255)``,
                   ``u ~ U[0, 1)`` (stochastic rounding, unbiased) or
                   ``u = 0.5`` (round to nearest)
dequantize         ``x_hat = q * rng / 255 + lo``
=================  =====================================================

Values outside ``[lo, lo + rng]`` saturate at 0 / 255 (the reference Mesa code
wrapped them modulo 256). A group whose ``lo`` or ``rng`` is not finite
dequantizes to NaN, so a NaN/Inf activation is never turned into a plausible
finite value (see :mod:`mesa_seg.mesa.observer`).

The noise of stochastic rounding is a counter-based hash of the element index
and a per-call seed, computed inside the same kernel: ``torch.rand_like`` alone
costs more than the op being compressed on CPU. With the ``'compile'`` backend
(default) every primitive is one fused ``torch.compile`` kernel (C++ on CPU,
Triton on CUDA); the ``'eager'`` backend is the plain-PyTorch fallback.
``MESA_BACKEND`` sets the default, :func:`use_backend` selects one for a block
of code, and :func:`compile_failed` tells whether compilation fell back to eager.
"""
from __future__ import annotations

import contextlib
import math
import os
import shutil
import warnings
from typing import Iterator, Optional, Tuple

import torch

__all__ = [
    'QMAX', 'group_view', 'batch_min_max', 'quantize', 'dequantize',
    'pack_bits', 'unpack_bits', 'new_seed', 'get_backend', 'set_backend', 'use_backend',
    'compile_failed', 'reset_compiled_kernels',
]

QMAX = 255  # uint8
_TINY = 1e-12  # a zero range (constant group) must not divide by zero
_NOISE_MASK = (1 << 24) - 1  # 24 random bits per element


# --------------------------------------------------------------------------- layout
def group_view(x: torch.Tensor, groups: int, dim: int) -> torch.Tensor:
    """View ``x`` as ``(outer, groups, inner)`` with contiguous groups along ``dim``.

    ``dim`` is the channel (or head) axis: -1 for ``(B, N, C)`` tokens, 1 for
    ``(B, C, H, W)`` maps and ``(B, heads, N, D)`` attention tensors.
    """
    dim = dim % x.dim()
    size = x.shape[dim]
    if size % groups:
        raise ValueError(
            f'Mesa: {groups} groups do not divide dimension {dim} of size {size} '
            f'(input shape {tuple(x.shape)})')
    outer = math.prod(x.shape[:dim])
    return x.reshape(outer, groups, -1)


# ----------------------------------------------------------------- eager kernels
def _batch_min_max(x3: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    # Reduce the contiguous inner axis first: twice as fast as amin(dim=(0, 2)).
    lo, hi = torch.aminmax(x3, dim=-1)
    return lo.amin(0).float(), hi.amax(0).float()


def _hash_noise(shape: torch.Size, seed: torch.Tensor, device) -> torch.Tensor:
    """U[0, 1) noise from a 32-bit integer hash of the flat element index.

    int32 arithmetic on purpose: it wraps (Triton, and in practice C++), and
    64-bit multiplies have no AVX2 instruction, which made the fused kernel
    markedly slower.
    """
    idx = torch.arange(math.prod(shape), device=device, dtype=torch.int32).view(shape)
    h = idx * 747796405 + seed.to(torch.int32)
    h = (h ^ (h >> 13)) * 1274126177
    h = h ^ (h >> 16)
    return (h & _NOISE_MASK).float() * (1.0 / (_NOISE_MASK + 1))


def _quantize_hash(x3, lo, rng, seed):
    scale = QMAX / rng.clamp_min(_TINY)
    y = (x3.float() - lo[None, :, None]) * scale[None, :, None]
    y = y + _hash_noise(x3.shape, seed, x3.device)
    # NaN compares false in clamp: map it to 0 explicitly (the group's stats carry
    # the NaN, see module docstring), so the uint8 cast is well defined.
    y = torch.nan_to_num(y, nan=0.0).floor().clamp(0, QMAX)
    return y.to(torch.uint8)


def _quantize_eager(x3, lo, rng, seed):
    scale = QMAX / rng.clamp_min(_TINY)
    y = torch.addcmul((-lo * scale)[None, :, None], x3.float(), scale[None, :, None])
    # The index hash is cheap only when fused. Eagerly, 8 random bits per element
    # (randint on uint8 is much cheaper than rand_like) from a generator seeded
    # by `seed`: the noise is a function of the seed, as in the fused kernel,
    # and torch's global RNG is left alone.
    gen = torch.Generator(device=x3.device).manual_seed(int(seed))
    noise = torch.randint(0, 256, x3.shape, dtype=torch.uint8, device=x3.device, generator=gen)
    y.add_(noise, alpha=1.0 / 256).add_(1.0 / 512)
    return torch.nan_to_num_(y, nan=0.0).floor_().clamp_(0, QMAX).to(torch.uint8)


def _quantize_nearest(x3, lo, rng):
    scale = QMAX / rng.clamp_min(_TINY)
    y = (x3.float() - lo[None, :, None]) * scale[None, :, None] + 0.5
    return torch.nan_to_num(y, nan=0.0).floor().clamp(0, QMAX).to(torch.uint8)


def _dequantize(q3, lo, rng, dtype: torch.dtype):
    step = rng * (1.0 / QMAX)
    return (q3.float() * step[None, :, None] + lo[None, :, None]).to(dtype)


def _pack_bits(mask8):
    # Eight shifted ORs fuse into one pass; a (x * weights).sum(-1) reduction
    # over the 8-wide axis compiled to a far slower kernel.
    m = mask8.to(torch.uint8)
    out = m[:, 0]
    for bit in range(1, 8):
        out = out | (m[:, bit] << bit)
    return out


_UNPACK_TABLES: dict = {}


def _unpack_table(device) -> torch.Tensor:
    """(256, 8) bool: the bits of every byte value (a gather beats shifting)."""
    table = _UNPACK_TABLES.get(device)
    if table is None:
        byte = torch.arange(256, dtype=torch.uint8, device=device)
        shifts = torch.arange(8, dtype=torch.uint8, device=device)
        table = _UNPACK_TABLES[device] = ((byte[:, None] >> shifts) & 1).bool()
    return table


# --------------------------------------------------------------------- backends
_EAGER = {
    'batch_min_max': _batch_min_max,
    'quantize_stochastic': _quantize_eager,
    'quantize_nearest': _quantize_nearest,
    'dequantize': _dequantize,
    'pack_bits': _pack_bits,
}
_FUSED = dict(_EAGER, quantize_stochastic=_quantize_hash)
_compiled: dict = {}
_backend: Optional[str] = None
_compile_failed = False


def _default_backend() -> str:
    choice = os.environ.get('MESA_BACKEND', 'compile').lower()
    if choice not in ('compile', 'eager'):
        raise ValueError(f"MESA_BACKEND must be 'compile' or 'eager', got {choice!r}")
    # Inductor needs a C++ compiler for CPU kernels.
    if choice == 'compile' and not (shutil.which('g++') or shutil.which('c++')
                                    or torch.cuda.is_available()):
        return 'eager'
    return choice


def get_backend() -> str:
    """The kernel backend in use: ``'compile'`` (fused) or ``'eager'``."""
    global _backend
    if _backend is None:
        _backend = _default_backend()
    return _backend


def set_backend(name: str) -> None:
    """Select ``'compile'`` or ``'eager'`` kernels (env ``MESA_BACKEND`` sets the default)."""
    global _backend
    if name not in ('compile', 'eager'):
        raise ValueError(f"backend must be 'compile' or 'eager', got {name!r}")
    _backend = name


def compile_failed() -> bool:
    """Whether compiling a kernel failed in this process, so that the
    ``'compile'`` backend runs the eager kernels (it warned once)."""
    return _compile_failed


def reset_compiled_kernels() -> None:
    """Drop the compiled kernels, dynamo's caches and an earlier compilation
    failure: the next ``'compile'`` kernel call compiles afresh.

    For a process that knows the cause of the failure is gone (e.g. a test
    session where an earlier test exhausted dynamo's recompile limit). It
    resets *all* of dynamo's state, not only Mesa's.
    """
    global _compile_failed
    torch._dynamo.reset()
    _compiled.clear()
    _compile_failed = False


@contextlib.contextmanager
def use_backend(name: str, retry: bool = False) -> Iterator[None]:
    """Run the enclosed code with ``'compile'`` or ``'eager'`` kernels, then
    select the previous backend again (even on an exception). A compilation
    failure inside is not undone: it is a fact about this process.

    Args:
        name (str): ``'compile'`` or ``'eager'``.
        retry (bool): with ``'compile'``, if an earlier compilation failure sent
            the kernels to eager for good (:func:`compile_failed`), first
            :func:`reset_compiled_kernels` so they compile again. Default: False.
    """
    prev = get_backend()
    set_backend(name)  # validates the name before anything else changes
    try:
        if retry and name == 'compile' and _compile_failed:
            reset_compiled_kernels()
        yield
    finally:
        set_backend(prev)


def _kernel(name: str):
    global _compile_failed
    if get_backend() == 'eager' or _compile_failed:
        return _EAGER[name]
    fn = _compiled.get(name)
    if fn is None:
        # Layouts (groups == 1, outer == 1) and dtypes each add a compiled variant;
        # dynamo's default limit of 8 is too low for a process that builds many
        # models (a test session) and would send every kernel to eager for good.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        fn = _compiled[name] = torch.compile(_FUSED[name], dynamic=True, fullgraph=True)
    return fn


def _run(name: str, *args):
    """Run a kernel; if compilation is impossible here, fall back to eager once, loudly."""
    global _compile_failed
    # Detached: dynamo guards on a view's ``_base`` layout and on requires_grad,
    # so every layer layout recompiled and the recompile limit sent all kernels
    # to eager for good.
    args = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
    try:
        # Kernels cast explicitly; autocast state would only add recompiles.
        with torch.autocast(args[0].device.type, enabled=False):
            return _kernel(name)(*args)
    except Exception as err:  # noqa: BLE001 - any inductor/toolchain failure
        if get_backend() == 'eager' or _compile_failed:
            raise
        # A genuine input error raises again here, from the eager twin.
        out = _EAGER[name](*args)
        _compile_failed = True
        warnings.warn(f'Mesa: torch.compile kernels unavailable ({type(err).__name__}: '
                      f'{err}); using eager kernels (slower). Set MESA_BACKEND=eager '
                      'to silence this.')
        return out


# ---------------------------------------------------------------------- public
@torch.no_grad()
def batch_min_max(x3: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-group minimum and maximum of a grouped view, as float32 ``(groups,)``.

    NaN propagates (``amin``/``amax`` keep NaN), so a non-finite group is visible in
    its statistics without an extra pass.
    """
    return _run('batch_min_max', x3)


def new_seed(device: torch.device) -> torch.Tensor:
    """A fresh seed drawn from torch's global RNG on ``device`` (no host sync).

    For ad-hoc use; layers derive their seeds from their own step counter
    (:class:`~mesa_seg.mesa.quantizer.ActivationQuantizer`) instead.
    """
    return torch.randint(0, 2**31 - 1, (), device=device, dtype=torch.int64)


@torch.no_grad()
def quantize(x3: torch.Tensor, lo: torch.Tensor, rng: torch.Tensor,
             seed: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Quantize a grouped view ``(outer, groups, inner)`` to uint8.

    Args:
        x3 (Tensor): floating tensor from :func:`group_view`.
        lo (Tensor): float32 ``(groups,)`` minimum of the range.
        rng (Tensor): float32 ``(groups,)`` width of the range (>= 0).
        seed (Tensor, optional): int64 scalar; stochastic rounding when given
            (see :func:`new_seed`), round-to-nearest when None. Default: None.

    Returns:
        Tensor: uint8 tensor of the shape of ``x3``; out-of-range values saturate.
    """
    if seed is None:
        return _run('quantize_nearest', x3, lo, rng)
    return _run('quantize_stochastic', x3, lo, rng, seed)


@torch.no_grad()
def dequantize(q3: torch.Tensor, lo: torch.Tensor, rng: torch.Tensor,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of :func:`quantize`: ``q * rng / 255 + lo`` in ``dtype``."""
    return _run('dequantize', q3, lo, rng, dtype)


@torch.no_grad()
def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Pack a boolean tensor into uint8, 8 elements per byte (flat, zero padded)."""
    flat = mask.reshape(-1)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return _run('pack_bits', flat.view(-1, 8))


@torch.no_grad()
def unpack_bits(packed: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: a boolean tensor of ``shape``."""
    table = _unpack_table(packed.device)
    flat = table.index_select(0, packed.to(torch.int32)).view(-1)
    return flat[:math.prod(shape)].view(shape)
