"""mesa_seg.mesa.primitives: grouping, quantize/dequantize, bit packing, backends."""
import math
import warnings

import pytest
import torch

import mesa_seg.mesa as mesa
from mesa_seg.mesa.primitives import (QMAX, batch_min_max, dequantize, group_view, new_seed,
                                      pack_bits, quantize, unpack_bits)
from mesa_utils import backend, eager_by_default  # noqa: F401


def _step(rng):
    return rng / QMAX


# ------------------------------------------------------------------- layout
def test_group_view_layout():
    x = torch.arange(2 * 3 * 4 * 6, dtype=torch.float32).view(2, 3, 4, 6)
    # Channel axis last: groups are contiguous channel blocks of every token.
    v = group_view(x, 3, -1)
    assert v.shape == (24, 3, 2)
    assert torch.equal(v[5, 1], x.view(24, 6)[5, 2:4])
    # Head axis 1 of (B, heads, N, D): one group per head, all of (N, D) inside.
    v = group_view(x, 3, 1)
    assert v.shape == (2, 3, 24)
    assert torch.equal(v[1, 2], x[1, 2].flatten())
    # Fewer groups than heads: contiguous heads share a group.
    x4 = torch.randn(2, 4, 5, 3)
    assert torch.equal(group_view(x4, 2, 1)[:, 1], x4[:, 2:].reshape(2, -1))


def test_group_view_non_dividing_is_an_error():
    with pytest.raises(ValueError, match='5 groups do not divide'):
        group_view(torch.randn(2, 8, 12), 5, -1)


def test_batch_min_max_per_group(backend):
    x = torch.randn(4, 3, 10)
    lo, hi = batch_min_max(x)
    assert lo.dtype == hi.dtype == torch.float32
    assert torch.equal(lo, x.amin((0, 2))) and torch.equal(hi, x.amax((0, 2)))
    # Low-precision input: statistics come back as float32, exactly. (Eager
    # only: the compiled bf16 kernels are exercised by test_ops' autocast test.)
    if backend == 'eager':
        xb = x.bfloat16()
        lo, hi = batch_min_max(xb)
        assert lo.dtype == torch.float32 and torch.equal(lo, xb.float().amin((0, 2)))


def test_batch_min_max_propagates_nan_and_inf(backend):
    x = torch.ones(2, 3, 4)
    x[1, 0, 2] = float('nan')
    x[0, 1, 1] = float('inf')
    lo, hi = batch_min_max(x)
    assert torch.isnan(lo[0]) and torch.isnan(hi[0])
    assert hi[1] == float('inf')
    assert lo[2] == hi[2] == 1


# ---------------------------------------------------------------- quantize
def _grid(groups=4, outer=32, inner=48):
    torch.manual_seed(0)
    x3 = torch.randn(outer, groups, inner) * torch.linspace(0.5, 4, groups)[:, None]
    lo, hi = batch_min_max(x3)
    return x3, lo, hi - lo


def test_round_trip_error_bounds(backend):
    x3, lo, rng = _grid()
    step = _step(rng)[None, :, None]
    q = quantize(x3, lo, rng)
    assert q.dtype == torch.uint8 and q.shape == x3.shape
    err = (dequantize(q, lo, rng) - x3).abs()
    # Round to nearest: half a step (plus float32 slack).
    assert (err <= step * (0.5 + 1e-4)).all()
    q = quantize(x3, lo, rng, new_seed(x3.device))
    err = (dequantize(q, lo, rng) - x3).abs()
    # Stochastic rounding moves to one of the two neighbouring levels.
    assert (err <= step * (1 + 1e-4)).all()
    # Both ends of the range are representable: min -> 0, max -> 255.
    assert q.amin((0, 2)).eq(0).all() and q.amax((0, 2)).eq(QMAX).all()


def test_backends_agree_on_nearest_rounding():
    x3, lo, rng = _grid()
    with mesa.use_backend('eager'):
        q_eager = quantize(x3, lo, rng)
        x_eager = dequantize(q_eager, lo, rng)
    with mesa.use_backend('compile', retry=True):
        q_comp = quantize(x3, lo, rng)
        x_comp = dequantize(q_comp, lo, rng)
    # Fused kernels may contract (x - lo) * s + 0.5 differently: a tie can land
    # on the other level, nothing more.
    assert (q_eager.int() - q_comp.int()).abs().max() <= 1
    assert (q_eager != q_comp).float().mean() < 1e-3
    assert torch.allclose(x_eager, x_comp, rtol=0, atol=1e-6 + _step(rng).max().item())
    assert not mesa.compile_failed()


def test_out_of_range_values_saturate_instead_of_wrapping(backend):
    lo, rng = torch.tensor([0.0]), torch.tensor([1.0])
    # 2.0 would be code 510 -> 254 modulo 256 in the reference implementation.
    x3 = torch.tensor([[[-5.0, -0.001, 0.0, 0.5, 1.0, 1.001, 2.0, 1e30, -1e30]]]).repeat(2, 1, 1)
    for seed in (None, new_seed(x3.device)):
        q = quantize(x3, lo, rng, seed)
        assert q[:, 0, [0, 1, 2, 8]].eq(0).all()
        assert q[:, 0, [4, 5, 6, 7]].eq(QMAX).all()
        assert 127 <= q[0, 0, 3] <= 128
        x_hat = dequantize(q, lo, rng)
        assert x_hat.min() == 0.0 and x_hat.max() == 1.0


def test_stochastic_rounding_is_unbiased(backend):
    # (a) Many elements with one value at fractional position 0.3: the mean code
    # is 3.3. Each code is 3 or 4 (Bernoulli(0.3)), so the std of the mean of
    # n codes is sqrt(0.21 / n); allow 5 sigma (+1/512, the eager backend's
    # 8-bit noise grid can bias by at most that).
    n = 1 << 16
    lo, rng = torch.tensor([0.0]), torch.tensor([255.0])
    x3 = torch.full((2, 1, n // 2), 3.3)
    q = quantize(x3, lo, rng, new_seed(x3.device)).float()
    assert set(q.unique().tolist()) == {3.0, 4.0}
    assert abs(q.mean().item() - 3.3) < 5 * math.sqrt(0.21 / n) + 1 / 512

    # (b) Random values, K calls: the mean of the dequantized copies converges
    # to x. Per element, std <= step / 2 per call, so <= step / (2 sqrt(K)) for
    # the mean; 6 sigma over 512 elements makes a false alarm ~1e-6.
    k = 200
    x3, lo, rng = _grid(groups=2, outer=16, inner=16)
    step = _step(rng)[None, :, None]
    mean = torch.zeros_like(x3)
    for _ in range(k):
        mean += dequantize(quantize(x3, lo, rng, new_seed(x3.device)), lo, rng)
    mean /= k
    bound = 6 * step / (2 * math.sqrt(k)) + step / 512
    assert ((mean - x3).abs() <= bound).all()
    # Round to nearest is biased on the same data, so the test has teeth: its
    # error is up to step / 2 per element, never shrinking with K.
    nearest = dequantize(quantize(x3, lo, rng), lo, rng)
    assert ((nearest - x3).abs() > bound).any()


def test_stochastic_rounding_is_reproducible_under_manual_seed(backend):
    x3, lo, rng = _grid()
    torch.manual_seed(123)
    q1 = quantize(x3, lo, rng, new_seed(x3.device))
    q2 = quantize(x3, lo, rng, new_seed(x3.device))
    torch.manual_seed(123)
    q3 = quantize(x3, lo, rng, new_seed(x3.device))
    assert torch.equal(q1, q3)
    assert not torch.equal(q1, q2)  # a fresh seed per call: fresh noise
    # Noise differs between elements of one call: the codes of equal values are
    # not all equal.
    flat = quantize(torch.full((2, 1, 500), 0.5), torch.tensor([0.0]), torch.tensor([255.0]),
                    new_seed(x3.device))
    assert flat.unique().numel() == 2


# ------------------------------------------------------------ degenerate input
def test_constant_groups_dequantize_exactly(backend):
    x3 = torch.empty(3, 2, 5)
    x3[:, 0] = 3.7
    x3[:, 1] = -1e-3
    lo, hi = batch_min_max(x3)
    rng = hi - lo
    assert torch.equal(rng, torch.zeros(2))
    for seed in (None, new_seed(x3.device)):
        q = quantize(x3, lo, rng, seed)
        x_hat = dequantize(q, lo, rng)
        assert torch.equal(x_hat, x3)  # no NaN from 0 / 0, no offset


def test_non_finite_range_dequantizes_to_nan(backend):
    # What the observer returns for a group that held NaN/Inf (see test_observer):
    # the codes are defined (no crash, no garbage) and dequantize to NaN.
    x3 = torch.randn(4, 2, 6)
    x3[0, 0, 0] = float('nan')
    lo = torch.tensor([float('nan'), -3.0])
    rng = torch.tensor([float('nan'), 6.0])
    for seed in (None, new_seed(x3.device)):
        q = quantize(x3, lo, rng, seed)
        x_hat = dequantize(q, lo, rng)
        assert torch.isnan(x_hat[:, 0]).all()
        assert torch.isfinite(x_hat[:, 1]).all()


def test_dequantize_dtype():
    x3, lo, rng = _grid()
    q = quantize(x3, lo, rng)
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        out = dequantize(q, lo, rng, dtype)
        assert out.dtype == dtype
        assert torch.equal(out, dequantize(q, lo, rng).to(dtype))


# ------------------------------------------------------------------ bit masks
@pytest.mark.parametrize('shape', [(16,), (3, 5, 7)])
def test_pack_bits_round_trip(backend, shape):
    mask = torch.rand(shape) > 0.5
    packed = pack_bits(mask)
    assert packed.dtype == torch.uint8
    assert packed.numel() == math.ceil(mask.numel() / 8)
    assert torch.equal(unpack_bits(packed, mask.shape), mask)


# ------------------------------------------------------------------- backends
def test_set_backend_validates():
    with pytest.raises(ValueError, match='backend must be'):
        mesa.set_backend('triton')
    mesa.set_backend('compile')
    assert mesa.get_backend() == 'compile'


def test_use_backend_restores_the_previous_backend():
    assert mesa.get_backend() == 'eager'  # the autouse fixture's choice
    with mesa.use_backend('compile'):
        assert mesa.get_backend() == 'compile'
        with mesa.use_backend('eager'):
            assert mesa.get_backend() == 'eager'
        assert mesa.get_backend() == 'compile'
    assert mesa.get_backend() == 'eager'
    with pytest.raises(RuntimeError, match='inside'):
        with mesa.use_backend('compile'):
            raise RuntimeError('inside')
    assert mesa.get_backend() == 'eager'
    with pytest.raises(ValueError, match='backend must be'):
        with mesa.use_backend('triton'):
            pass
    assert mesa.get_backend() == 'eager'


def test_a_failed_compilation_falls_back_to_eager_until_retried(monkeypatch):
    from mesa_seg.mesa import primitives

    def broken(*args):
        raise RuntimeError('no compiler here')

    # The kernel cache and failure flag are swapped for this test only, so the
    # process keeps its real compiled kernels; "compiling" returns the function.
    monkeypatch.setattr(primitives, '_compiled', {'quantize_nearest': broken})
    monkeypatch.setattr(primitives, '_compile_failed', False)
    monkeypatch.setattr(torch._dynamo, 'reset', lambda: None)
    monkeypatch.setattr(torch, 'compile', lambda fn, **kwargs: fn)
    x3, lo, rng = _grid()
    with mesa.use_backend('eager'):
        expected = quantize(x3, lo, rng)
    with mesa.use_backend('compile'):
        with pytest.warns(UserWarning, match='no compiler here'):
            assert torch.equal(quantize(x3, lo, rng), expected)
        assert mesa.compile_failed()
    assert mesa.compile_failed()  # a fact about the process, kept on exit
    with mesa.use_backend('compile'), warnings.catch_warnings():
        warnings.simplefilter('error')  # no retry: eager kernels, no second warning
        assert torch.equal(quantize(x3, lo, rng), expected)
        assert mesa.compile_failed()
    with mesa.use_backend('compile', retry=True):
        assert not mesa.compile_failed()
        assert torch.equal(quantize(x3, lo, rng), expected)
        assert not mesa.compile_failed()
    assert primitives._compiled['quantize_nearest'] is primitives._FUSED['quantize_nearest']


def _quantize_like_a_layer(x, groups, dim=-1):
    x3 = group_view(x, groups, dim)
    lo, hi = batch_min_max(x3)
    q = quantize(x3, lo, hi - lo, new_seed(x.device))
    return dequantize(q, lo, hi - lo, x.dtype).view(x3.shape)


def test_compiled_kernels_do_not_recompile_per_layer_layout():
    # Every layer hands the kernels a differently shaped, often viewed, tensor
    # that may require grad. One compiled graph per (dtype, groups == 1) must
    # serve them all: dynamo's recompile limit (8) otherwise sends every kernel
    # to the eager fallback for the rest of the process.
    with mesa.use_backend('compile', retry=True):
        _check_one_graph_per_layout()
    assert not mesa.compile_failed()


def _check_one_graph_per_layout():
    torch.manual_seed(0)
    # Warm-up sizes all distinct: dynamo "duck-sizes" equal sizes into a guard.
    _quantize_like_a_layer(torch.randn(2, 10, 96, requires_grad=True), 3)
    _quantize_like_a_layer(torch.randn(4, 6, 49, 32), 1, dim=1)
    layouts = [
        (torch.randn(2, 49, 64), 2, -1),                          # no grad, not a view
        (torch.randn(3, 8, 12, requires_grad=True)[:, 1:], 4, -1),  # strided view
        (torch.randn(2, 64, 7, 7, requires_grad=True), 4, 1),     # NCHW, channel groups
        (torch.randn(8, 3, 49, 32).transpose(-1, -2), 3, 1),       # k^T of attention
        (torch.randn(2, 6, 5, 5), 1, 1),
    ]
    with torch.compiler.set_stance('fail_on_recompile'):
        for x, groups, dim in layouts:
            x_hat = _quantize_like_a_layer(x, groups, dim)
            torch.testing.assert_close(x_hat, group_view(x, groups, dim), rtol=0,
                                       atol=(x.max() - x.min()).item() / 255 * 1.001)
