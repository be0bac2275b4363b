"""Shared helpers of the Mesa core tests (tests/test_{primitives,observer,ops,
modules_policy,audit}.py): backend selection, saved-byte accounting, gradient
error metrics."""
from typing import Callable, Iterable, Tuple

import pytest
import torch

import mesa_seg.mesa as mesa

# Bound on the gradient error of one Mesa op vs torch, on random inputs.
# 8-bit quantization of a group with range r has step s = r / 255; stochastic
# rounding makes each dequantized element unbiased with error |e| < s and
# std <= s/2 (about s/sqrt(6) on average over fractional positions). For Gaussian
# activations r is ~7 sigma for the small tensors used here, so the relative
# L2 error of the stored activation is ~7 / (255 * sqrt(6)) ~= 1.1%, and every
# gradient computed from it (a linear function of it, or a smooth one) inherits
# about the same relative error: we allow 3% (measured 0.2-1.7%). Cosine
# similarity is then >= 1 - 0.03**2 / 2 > 0.999.
GRAD_REL_L2 = 0.03
GRAD_COSINE = 0.999


@pytest.fixture(autouse=True)
def eager_by_default():
    """Run every test on the eager kernels unless it asks for ``backend``
    (the 'compile' backend costs ~20 s of compilation per process, so only the
    tests where the kernels matter run it), and restore the previous choice."""
    with mesa.use_backend('eager'):
        yield


@pytest.fixture(params=['eager', 'compile'])
def backend(request, eager_by_default):
    """Parametrize a test over both kernel backends. 'compile' retries
    compilation if earlier tests in this process made it fall back to eager
    (e.g. by exhausting dynamo's recompile limit: one graph per dtype /
    autocast state / size-1 dim)."""
    with mesa.use_backend(request.param, retry=True):
        yield request.param
        # On any dynamo/inductor failure the compile backend warns once and runs
        # eager for the rest of the process: a 'compile' test must have compiled.
        if request.param == 'compile':
            assert not mesa.compile_failed(), 'compile backend fell back to eager'


def saved_bytes(fn: Callable[[], torch.Tensor], exclude: Iterable[torch.Tensor] = ()
                ) -> Tuple[torch.Tensor, int]:
    """Run ``fn`` and count the bytes autograd saved for backward: unique
    storages, excluding those of ``exclude`` (parameters, buffers)."""
    owned = {t.untyped_storage().data_ptr() for t in exclude}
    storages = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in owned:
            storages[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(storages.values())


def grad_error(ref: torch.Tensor, got: torch.Tensor) -> Tuple[float, float]:
    """(relative L2 error, cosine similarity) of ``got`` vs ``ref``, in float64."""
    ref, got = ref.double().flatten(), got.double().flatten()
    rel = ((got - ref).norm() / ref.norm()).item()
    cos = torch.nn.functional.cosine_similarity(ref, got, dim=0).item()
    return rel, cos


def assert_grad_close(ref: torch.Tensor, got: torch.Tensor, what: str = 'grad',
                      rel_l2: float = GRAD_REL_L2, cosine: float = GRAD_COSINE) -> None:
    assert got.shape == ref.shape and got.dtype == ref.dtype, what
    assert torch.isfinite(got).all(), f'{what}: non-finite gradient'
    rel, cos = grad_error(ref, got)
    assert rel <= rel_l2 and cos >= cosine, f'{what}: rel L2 {rel:.4f}, cosine {cos:.6f}'
