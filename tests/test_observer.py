"""mesa_seg.mesa.observer / quantizer: running-estimate ranges held in buffers."""
import pytest
import torch
import torch.distributed as dist

from mesa_seg.mesa import (ActivationQuantizer, MesaGELU, MesaLinear, QuantizerConfig,
                           RunningRange)
from mesa_seg.mesa.primitives import QMAX, group_view
from mesa_seg.mesa.quantizer import pack_softmax_input
from mesa_utils import backend, eager_by_default  # noqa: F401  (fixtures)

NAN = float('nan')


def _batch(groups=3, scale=1.0, shift=0.0, seed=0):
    torch.manual_seed(seed)
    return torch.randn(8, groups, 20) * scale + shift


def test_estimates_are_buffers_not_parameters():
    obs = RunningRange(QuantizerConfig(groups=3))
    assert list(obs.parameters()) == []
    assert set(obs.state_dict()) == {'running_min', 'running_range', 'initialized'}
    assert obs.running_min.shape == obs.running_range.shape == (3,)
    assert not obs.initialized.any()


def test_first_batch_initialises():
    obs = RunningRange(QuantizerConfig(groups=3))
    x = _batch()
    lo, rng = obs(x)
    assert torch.equal(obs.running_min, x.amin((0, 2)))
    assert torch.equal(obs.running_range, x.amax((0, 2)) - x.amin((0, 2)))
    assert obs.initialized.all()
    assert torch.equal(lo, obs.running_min) and torch.equal(rng, obs.running_range)


@pytest.mark.parametrize('momentum', [0.9, 0.5])
def test_ema_update_formula(momentum):
    obs = RunningRange(QuantizerConfig(groups=3, momentum=momentum))
    x1, x2 = _batch(seed=1), _batch(scale=3.0, shift=2.0, seed=2)
    obs(x1)
    lo1, rng1 = obs.running_min.clone(), obs.running_range.clone()
    lo, rng = obs(x2)
    bmin, bmax = x2.amin((0, 2)), x2.amax((0, 2))
    # The paper's update, evaluated with the same float32 operations.
    assert torch.equal(obs.running_min, momentum * lo1 + (1 - momentum) * bmin)
    assert torch.equal(obs.running_range, momentum * rng1 + (1 - momentum) * (bmax - bmin))
    # The batch is quantized with the *updated* estimates.
    assert torch.equal(lo, obs.running_min) and torch.equal(rng, obs.running_range)


def test_defaults_are_the_papers():
    config = QuantizerConfig()
    assert (config.groups, config.momentum) == (1, 0.9)
    assert config.stochastic_rounding and not config.sync_stats and not config.widen_to_batch
    assert RunningRange().config == ActivationQuantizer().config == config
    assert RunningRange(QuantizerConfig(groups=3)).groups == 3


def test_no_update_when_asked():
    obs = RunningRange(QuantizerConfig(groups=3))
    obs(_batch(seed=1))
    state = {k: v.clone() for k, v in obs.state_dict().items()}
    lo, rng = obs(_batch(scale=5.0, seed=2), update=False)
    for k, v in obs.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert torch.equal(lo, state['running_min']) and torch.equal(rng, state['running_range'])


def test_uninitialised_estimates_fall_back_to_the_batch_without_update():
    obs = RunningRange(QuantizerConfig(groups=3))
    x = _batch()
    lo, rng = obs(x, update=False)
    assert not obs.initialized.any()
    assert torch.equal(lo, x.amin((0, 2)))
    assert torch.equal(rng, x.amax((0, 2)) - x.amin((0, 2)))


def test_quantizer_updates_before_quantizing_and_saturates():
    quant = ActivationQuantizer(QuantizerConfig(groups=2, stochastic_rounding=False), dim=-1)
    x1 = torch.rand(4, 6, 8)                  # range ~[0, 1] per group
    quant.pack(x1)
    x2 = torch.rand(4, 6, 8) * 100.0 - 50.0   # far outside the running range
    packed = quant.pack(x2)
    # Estimates absorbed this batch before it was quantized...
    assert torch.equal(packed.lo, quant.running_min)
    assert torch.equal(packed.rng, quant.running_range)
    assert (quant.running_range > 1.0).all()
    # ...and values beyond them clamp to the end codes (saturate, no wrap).
    x3 = group_view(x2, 2, -1)
    lo, hi = packed.lo[None, :, None], (packed.lo + packed.rng)[None, :, None]
    above, below = x3 >= hi, x3 <= lo
    assert above.any() and below.any()
    assert (packed.q[above] == QMAX).all() and (packed.q[below] == 0).all()
    x_hat = group_view(quant.unpack(packed, x2.shape, x2.dtype), 2, -1)
    # 255 * (rng / 255) + lo == lo + rng up to float32 rounding.
    torch.testing.assert_close(x_hat[above], hi.expand_as(x3)[above])
    assert torch.equal(x_hat[below], lo.expand_as(x3)[below])
    assert torch.isfinite(x_hat).all()


def test_widen_covers_the_batch_and_keeps_the_ema():
    plain = RunningRange(QuantizerConfig(groups=3))
    wide = RunningRange(QuantizerConfig(groups=3, widen_to_batch=True))
    x1, x2 = _batch(seed=1), _batch(scale=4.0, shift=1.0, seed=2)  # x2 outgrows the EMA
    for obs in (plain, wide):
        obs(x1)
    lo_p, rng_p = plain(x2)
    lo_w, rng_w = wide(x2)
    # Same running estimates (the EMA is not widened)...
    assert torch.equal(wide.running_min, plain.running_min)
    assert torch.equal(wide.running_range, plain.running_range)
    # ...the plain range clips this batch, the widened one is the union of both.
    bmin, bmax = x2.amin((0, 2)), x2.amax((0, 2))
    assert ((bmin < lo_p) | (bmax > lo_p + rng_p)).all()
    assert torch.equal(lo_w, torch.minimum(lo_p, bmin))
    torch.testing.assert_close(lo_w + rng_w, torch.maximum(lo_p + rng_p, bmax))
    # A batch inside the running range is quantized with the running range itself.
    x3 = x1 * 0.1
    lo_p3, rng_p3 = plain(x3)
    lo_w3, rng_w3 = wide(x3)
    assert torch.equal(lo_w3, lo_p3) and torch.equal(rng_w3, rng_p3)


def test_widened_quantizer_never_saturates():
    quant = ActivationQuantizer(
        QuantizerConfig(groups=2, stochastic_rounding=False, widen_to_batch=True), dim=-1)
    quant.pack(torch.rand(4, 6, 8))
    x2 = torch.rand(4, 6, 8) * 100.0 - 50.0   # far outside the running range
    packed = quant.pack(x2)
    x_hat = quant.unpack(packed, x2.shape, x2.dtype)
    step = (packed.rng / QMAX).max()
    assert (x_hat - x2).abs().max() <= step / 2 + 1e-4  # nearest rounding, no clipping
    assert 'widen_to_batch=True' in repr(quant)


def test_widen_keeps_nan_groups_nan():
    obs = RunningRange(QuantizerConfig(groups=3, widen_to_batch=True))
    obs(_batch(seed=1))
    x = _batch(seed=2)
    x[:, 1, 0] = NAN
    lo, rng = obs(x)
    assert torch.isnan(lo[1]) and torch.isnan(rng[1])
    assert torch.isfinite(lo[[0, 2]]).all() and torch.isfinite(rng[[0, 2]]).all()


def test_quantizer_uses_training_flag():
    quant = ActivationQuantizer(QuantizerConfig(groups=1))
    quant.pack(torch.randn(4, 8))
    before = quant.running_range.clone()
    quant.eval()
    quant.pack(torch.randn(4, 8) * 10)
    assert torch.equal(quant.running_range, before)
    quant.train()
    quant.pack(torch.randn(4, 8) * 10)
    assert not torch.equal(quant.running_range, before)


@pytest.mark.parametrize('mode', ['eval', 'no_grad', 'disabled', 'train'])
def test_module_updates_only_in_training_forward(mode):
    lin = MesaLinear(8, 4, mesa_config=QuantizerConfig(groups=2))
    x = torch.randn(3, 8)
    lin(x)  # first batch initialises
    before = {k: v.clone() for k, v in lin.quantizer.state_dict().items()}
    x2 = torch.randn(3, 8) * 7
    if mode == 'eval':
        lin.eval()
        lin(x2)
    elif mode == 'no_grad':
        with torch.no_grad():
            lin(x2)
    elif mode == 'disabled':
        lin.mesa_enabled = False
        lin(x2)
    else:
        lin(x2)
    changed = not torch.equal(lin.quantizer.running_range, before['running_range'])
    assert changed == (mode == 'train')


@pytest.mark.parametrize('bad', [NAN, float('inf'), -float('inf')])
def test_non_finite_batch_leaves_estimates_unchanged(bad):
    obs = RunningRange(QuantizerConfig(groups=3))
    obs(_batch(seed=1))
    lo0, rng0 = obs.running_min.clone(), obs.running_range.clone()
    x = _batch(scale=4.0, seed=2)
    x[3, 1, 5] = bad
    lo, rng = obs(x)
    # Group 1 keeps its old estimates; the others absorb the batch.
    assert obs.running_min[1] == lo0[1] and obs.running_range[1] == rng0[1]
    assert (obs.running_range[[0, 2]] != rng0[[0, 2]]).all()
    assert torch.isfinite(obs.running_min).all() and torch.isfinite(obs.running_range).all()
    # The range returned for *this* batch is NaN for group 1 only: its
    # dequantized copy becomes NaN instead of a plausible clipped value.
    assert torch.isnan(lo[1]) and torch.isnan(rng[1])
    assert torch.isfinite(lo[[0, 2]]).all() and torch.isfinite(rng[[0, 2]]).all()


def test_group_first_seen_non_finite_initialises_later():
    obs = RunningRange(QuantizerConfig(groups=2))
    x = _batch(groups=2, seed=1)
    x[0, 0, 0] = NAN
    obs(x)
    assert obs.initialized.tolist() == [False, True]
    x2 = _batch(groups=2, seed=2)
    obs(x2)
    assert obs.initialized.all()
    # Group 0's first finite batch initialises it (no EMA from the zero init).
    assert obs.running_min[0] == x2[:, 0].min()
    assert obs.running_range[0] == x2[:, 0].max() - x2[:, 0].min()


def test_nan_activation_gives_nan_gradient_in_its_group_only():
    # Documented in observer.py: the fault must show in the gradient, never
    # as a plausible finite value.
    gelu = MesaGELU(mesa_config=QuantizerConfig(groups=2))
    gelu(torch.randn(4, 8, requires_grad=True))
    state = {k: v.clone() for k, v in gelu.quantizer.state_dict().items()}
    x = torch.randn(4, 8)
    x[2, 1] = NAN  # channel 1 -> group 0 (channels 0-3)
    x.requires_grad_(True)
    y = gelu(x)
    torch.testing.assert_close(y, torch.nn.functional.gelu(x), rtol=0, atol=0, equal_nan=True)
    (g,) = torch.autograd.grad(y, x, torch.ones_like(y))
    assert torch.isnan(g[:, :4]).all()
    assert torch.isfinite(g[:, 4:]).all()
    for k in ('running_min', 'running_range', 'initialized'):  # group 0 unchanged
        assert torch.equal(getattr(gelu.quantizer, k)[:1], state[k][:1]), k


def test_config_validation():
    with pytest.raises(ValueError, match=r'momentum must be in \[0, 1\)'):
        QuantizerConfig(momentum=1.0)
    with pytest.raises(ValueError, match='momentum'):
        QuantizerConfig(momentum=-0.1)
    with pytest.raises(ValueError, match='groups must be a positive int'):
        QuantizerConfig(groups=0)
    with pytest.raises(ValueError, match='groups must be a positive int'):
        QuantizerConfig(groups=2.0)
    config = QuantizerConfig(groups=2)
    with pytest.raises(AttributeError):
        config.groups = 4  # frozen: shared by every quantizer built from it
    assert hash(config) == hash(QuantizerConfig(groups=2))


def test_state_dict_round_trip():
    a = RunningRange(QuantizerConfig(groups=3, momentum=0.8))
    a(_batch(seed=1))
    a(_batch(scale=2.0, seed=2))
    b = RunningRange(QuantizerConfig(groups=3, momentum=0.8))
    b.load_state_dict(a.state_dict())
    for k, v in a.state_dict().items():
        assert torch.equal(b.state_dict()[k], v), k
    x = _batch(scale=3.0, seed=3)
    assert all(torch.equal(u, v) for u, v in zip(a(x), b(x)))


def test_missing_estimates_are_not_an_error_even_when_strict():
    obs = RunningRange(QuantizerConfig(groups=3))
    result = obs.load_state_dict({}, strict=True)
    assert result.missing_keys == []
    assert not obs.initialized.any()  # still initialises from the first batch


@pytest.fixture
def single_rank_group(tmp_path):
    store = dist.FileStore(str(tmp_path / 'store'), 1)
    dist.init_process_group('gloo', store=store, rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize('sync', [True, False])
def test_sync_all_reduces_batch_statistics(single_rank_group, monkeypatch, sync):
    calls = []
    real = dist.all_reduce

    def spy(tensor, op=dist.ReduceOp.SUM, **kwargs):
        calls.append(op)
        return real(tensor, op=op, **kwargs)

    monkeypatch.setattr(dist, 'all_reduce', spy)
    obs = RunningRange(QuantizerConfig(groups=3, sync_stats=sync))
    x = _batch()
    obs(x)
    # Min of minima and max of maxima: every rank ends with the global range.
    assert calls == ([dist.ReduceOp.MIN, dist.ReduceOp.MAX] if sync else [])
    assert torch.equal(obs.running_min, x.amin((0, 2)))


# ------------------------------------------------------- softmax inputs (loss)
def test_softmax_input_codes_keep_each_positions_top_and_bottom_score(backend):
    torch.manual_seed(0)
    scores = torch.randn(150, 6, 5) * 8
    scores[:, 0, 0] = float('nan')  # one position's scores are not finite
    packed = pack_softmax_input(scores)
    assert packed.q.dtype == torch.uint8 and packed.q.shape == (150, 30, 1)
    assert packed.lo.shape == packed.rng.shape == (30, )
    restored = ActivationQuantizer.unpack(packed, scores.shape, torch.float32)
    assert restored.shape == scores.shape
    assert torch.isnan(restored[:, 0, 0]).all()  # never a plausible finite value
    ok = torch.ones(6, 5, dtype=torch.bool)
    ok[0, 0] = False
    x, x_hat = scores[:, ok], restored[:, ok]
    # Each position its own range: nothing saturates, the top score (the one
    # the softmax weighs most) and the bottom one come back exactly.
    torch.testing.assert_close(x_hat.amax(0), x.amax(0), rtol=0, atol=1e-5)
    torch.testing.assert_close(x_hat.amin(0), x.amin(0), rtol=0, atol=1e-5)
    # Round to nearest: at most half a step of that position's own range.
    half_step = (x.amax(0) - x.amin(0)) / 255 / 2
    assert ((x_hat - x).abs() <= half_step * (1 + 1e-4) + 1e-6).all()
    assert ((x_hat - x).abs() > half_step / 4).any()  # it is lossy: 8 bits, not a copy
