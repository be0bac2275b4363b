"""mesa_seg.mesa.ops (through the drop-in modules): every Mesa op against torch.

Per op: forward bit-identical to torch, gradients within the 8-bit error bound
(see ``mesa_utils.GRAD_REL_L2``), backward equal to torch's backward evaluated
at the dequantized activation, and the bytes autograd saves.
"""
import copy
from dataclasses import dataclass, field
from typing import Callable, Tuple

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from mesa_seg.mesa import LAYER_TYPES, ActivationQuantizer, MatMul, QuantizerConfig
from mesa_utils import (assert_grad_close, backend, eager_by_default,  # noqa: F401
                        saved_bytes)


@dataclass
class Case:
    """One op under test: a torch module, its inputs and the Mesa groups."""
    make: Callable[[], nn.Module]
    shapes: Tuple[Tuple[int, ...], ...]
    groups: int = 1
    call: Callable = field(default=lambda mod, *xs: mod(*xs))

    def build(self, dtype=torch.float32, seed=0):
        torch.manual_seed(seed)
        ref = self.make().to(dtype)
        mesa_cls = next(m for t, m in LAYER_TYPES.values() if type(ref) is t)
        model = mesa_cls.from_float(copy.deepcopy(ref), QuantizerConfig(groups=self.groups))
        xs = [torch.randn(s, dtype=dtype, requires_grad=True) for s in self.shapes]
        return ref, model, xs


def _inplace_relu(mod, x):
    return mod(x * 1)  # in-place needs a non-leaf input


CASES = {
    'linear': Case(lambda: nn.Linear(64, 32), ((2, 16, 64),), groups=4),
    'conv2d': Case(lambda: nn.Conv2d(8, 16, 3, padding=1), ((2, 8, 12, 12),), groups=2),
    'conv2d_stride_dilation': Case(lambda: nn.Conv2d(8, 16, 3, stride=2, padding=2,
                                                     dilation=2), ((2, 8, 13, 13),)),
    'conv2d_grouped_reflect': Case(lambda: nn.Conv2d(8, 16, 3, padding=1, groups=4,
                                                     padding_mode='reflect'),
                                   ((2, 8, 12, 12),), groups=4),
    'conv2d_grouped_zeros': Case(lambda: nn.Conv2d(8, 16, 3, padding=1, groups=4),
                                 ((2, 8, 12, 12),), groups=4),
    # An even kernel's 'same' padding is asymmetric (1 before, 2 after).
    'conv2d_same_even_replicate': Case(lambda: nn.Conv2d(8, 8, 4, padding='same',
                                                         padding_mode='replicate'),
                                       ((2, 8, 12, 12),), groups=2),
    'conv2d_same_circular': Case(lambda: nn.Conv2d(8, 8, (3, 5), padding='same', bias=False,
                                                   padding_mode='circular'),
                                 ((2, 8, 12, 12),)),
    'layer_norm': Case(lambda: nn.LayerNorm(64, eps=1e-6), ((2, 16, 64),), groups=4),
    'layer_norm_no_affine': Case(lambda: nn.LayerNorm(64, elementwise_affine=False),
                                 ((2, 16, 64),)),
    'gelu': Case(lambda: nn.GELU(), ((2, 16, 64),), groups=4),
    'gelu_tanh': Case(lambda: nn.GELU(approximate='tanh'), ((2, 16, 64),)),
    'softmax': Case(lambda: nn.Softmax(dim=-1), ((2, 4, 16, 16),), groups=4),
    'matmul': Case(lambda: MatMul(), ((2, 4, 16, 8), (2, 4, 8, 16)), groups=4),
    'matmul_broadcast_batch': Case(lambda: MatMul(), ((1, 4, 16, 8), (2, 4, 8, 16)), groups=2),
    'matmul_broadcast_2d': Case(lambda: MatMul(), ((2, 4, 16, 8), (8, 12))),
    'batch_norm': Case(lambda: nn.BatchNorm2d(8), ((4, 8, 6, 6),), groups=2),
    'batch_norm_cumulative': Case(lambda: nn.BatchNorm2d(8, momentum=None), ((4, 8, 6, 6),)),
    'batch_norm_no_stats': Case(lambda: nn.BatchNorm2d(8, affine=False,
                                                       track_running_stats=False),
                                ((4, 8, 6, 6),)),
    'relu': Case(lambda: nn.ReLU(), ((2, 8, 6, 6),)),
    'relu_inplace': Case(lambda: nn.ReLU(inplace=True), ((2, 8, 6, 6),), call=_inplace_relu),
}


def _run(case, mod, xs):
    """Forward (counting saved bytes) and gradients of a random cotangent."""
    params = list(mod.parameters())
    y, nbytes = saved_bytes(lambda: case.call(mod, *xs), params + list(mod.buffers()))
    torch.manual_seed(1)
    gy = torch.randn_like(y)
    grads = torch.autograd.grad(y, xs + params, gy)
    return y, grads, nbytes


def _bytes_ratio_bounds(name, dtype):
    itemsize = torch.finfo(dtype).bits // 8
    # uint8 codes for a float activation: 1/4 of fp32, 1/2 of fp16/bf16; ReLU
    # stores 1 bit per element instead of torch's saved output.
    base = 1 / (8 * itemsize) if name.startswith('relu') else 1 / itemsize
    # Tiny per-group (lo, range) and per-row statistics come on top (LayerNorm
    # keeps fp32 mean/rstd per token: +11% at 64 channels and 4 groups).
    return base * 0.9, base * (1.15 if name.startswith('layer_norm') else 1.1)


def _assert_state_equal(ref, model):
    for k, v in ref.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k


# ---------------------------------------------------------------- fp32 vs torch
@pytest.mark.parametrize('name', CASES)
def test_op_matches_torch(name, backend):
    case = CASES[name]
    ref, model, xs = case.build()
    y_ref, g_ref, bytes_ref = _run(case, ref, xs)
    y, g, nbytes = _run(case, model, xs)
    assert torch.equal(y, y_ref)
    _assert_state_equal(ref, model)  # e.g. BatchNorm running statistics
    for i, (a, b) in enumerate(zip(g_ref, g)):
        if name.startswith('relu'):
            assert torch.equal(a, b)  # the 1-bit mask is exact
        else:
            assert_grad_close(a, b, f'{name} grad {i}')
    lo, hi = _bytes_ratio_bounds(name, torch.float32)
    if name == 'matmul_broadcast_batch':
        lo = 0  # torch saves the broadcast (expanded) operand; Mesa the original
    if name in ('conv2d_grouped_reflect', 'conv2d_same_even_replicate'):
        # torch keeps the unpadded input too (the pad's backward reads its
        # shape from it); Mesa keeps only the padded one, in 8 bits.
        bytes_ref -= xs[0].numel() * xs[0].element_size()
    assert lo <= nbytes / bytes_ref <= hi, f'{name}: saved {nbytes} B vs torch {bytes_ref} B'


# ------------------------------------------------- backward = torch's at x_hat
@pytest.fixture
def captured(monkeypatch):
    """Dequantized activations produced in backward, in order."""
    seen = []
    unpack = ActivationQuantizer.unpack

    def spy(packed, shape, dtype):
        out = unpack(packed, shape, dtype)
        seen.append(out)
        return out

    monkeypatch.setattr(ActivationQuantizer, 'unpack', staticmethod(spy))
    return seen


def _reference_grads(name, ref, xs, x_hats, gy):
    """torch's gradients with the saved activation replaced by its dequantized copy."""
    if name in ('linear', 'conv2d', 'conv2d_stride_dilation'):
        # Weight/bias gradients need only x; the input gradient needs only W.
        (x_hat,) = x_hats
        leaf = x_hat.detach().requires_grad_(True)
        g_w = torch.autograd.grad(ref(leaf), list(ref.parameters()), gy)
        g_x = torch.autograd.grad(ref(xs[0]), xs[0], gy)
        return list(g_x) + list(g_w)
    if name in ('gelu', 'gelu_tanh'):
        (x_hat,) = x_hats
        leaf = x_hat.detach().requires_grad_(True)
        return list(torch.autograd.grad(ref(leaf), leaf, gy))
    if name == 'softmax':
        (y_hat,) = x_hats
        return [y_hat * (gy - (gy * y_hat).sum(-1, keepdim=True))]
    if name.startswith('matmul'):
        b_hat, a_hat = x_hats  # backward unpacks b (for grad a) first
        ga = (gy @ b_hat.transpose(-1, -2)).sum_to_size(xs[0].shape)
        gb = (a_hat.transpose(-1, -2) @ gy).sum_to_size(xs[1].shape)
        return [ga, gb]
    raise KeyError(name)


@pytest.mark.parametrize('name', ['linear', 'conv2d', 'conv2d_stride_dilation', 'gelu',
                                  'gelu_tanh', 'softmax', 'matmul', 'matmul_broadcast_batch'])
def test_backward_is_torch_backward_at_dequantized_activation(name, captured):
    case = CASES[name]
    ref, model, xs = case.build()
    y, grads, _ = _run(case, model, xs)
    torch.manual_seed(1)
    gy = torch.randn_like(y)
    expected = _reference_grads(name, ref, xs, captured, gy)
    assert len(expected) == len(grads)
    for a, b in zip(expected, grads):
        torch.testing.assert_close(b, a)


def test_linear_backward_has_no_per_sample_weight_gradient():
    # The reference Mesa built a (B, out, in) tensor for 3-D inputs.
    class Shapes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.shapes = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    self.shapes.append(tuple(t.shape))
            return out

    ref, model, xs = CASES['linear'].build()
    y = model(xs[0])
    mode = Shapes()
    with mode:
        y.backward(torch.ones_like(y))
    assert (32, 64) in mode.shapes  # the weight gradient itself
    assert not any(len(s) == 3 and s[1:] == (32, 64) for s in mode.shapes), mode.shapes


# ----------------------------------------------------------- low precision
@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
@pytest.mark.parametrize('name', ['linear', 'conv2d', 'layer_norm', 'gelu', 'softmax',
                                  'matmul', 'batch_norm', 'relu'])
def test_low_precision_inputs(name, dtype):
    case = CASES[name]
    ref, model, xs = case.build(dtype)
    y_ref, g_ref, bytes_ref = _run(case, ref, xs)
    y, g, nbytes = _run(case, model, xs)
    assert y.dtype == dtype and torch.equal(y, y_ref)
    for i, (a, b) in enumerate(zip(g_ref, g)):
        assert_grad_close(a, b, f'{name} {dtype} grad {i}')
    lo, hi = _bytes_ratio_bounds(name, dtype)
    assert lo <= nbytes / bytes_ref <= hi, f'{name}: saved {nbytes} B vs torch {bytes_ref} B'


class _Block(nn.Module):
    """LayerNorm -> attention (MatMul/Softmax) -> MLP, plus a conv-BN-ReLU branch:
    every op type in the dtype flow autocast gives it."""

    def __init__(self, c=32, heads=4):
        super().__init__()
        self.num_heads = heads
        self.norm = nn.LayerNorm(c)
        self.qkv = nn.Linear(c, 3 * c)
        self.qk = MatMul()
        self.softmax = nn.Softmax(dim=-1)
        self.av = MatMul()
        self.fc1 = nn.Linear(c, 2 * c)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(2 * c, c)
        # No bias: BatchNorm cancels it, its true gradient is 0 (pure noise).
        self.conv = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c)
        self.relu = nn.ReLU()

    def forward(self, x):  # x: (B, N, C), N a square
        B, N, C = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(B, N, 3, self.num_heads, -1).permute(
            2, 0, 3, 1, 4)
        attn = self.softmax(self.qk(q, k.transpose(-2, -1)) * q.shape[-1] ** -0.5)
        x = x + self.av(attn, v).transpose(1, 2).reshape(B, N, C)
        x = x + self.fc2(self.act(self.fc1(x)))
        h = int(N ** 0.5)
        fmap = x.transpose(1, 2).reshape(B, C, h, h)
        return self.relu(self.bn(self.conv(fmap)))


def test_autocast_bf16(backend):
    from mesa_seg.mesa import mesafy_
    torch.manual_seed(0)
    ref = _Block()
    model = mesafy_(copy.deepcopy(ref))
    x = torch.randn(2, 16, 32)
    outs, grads = [], []
    for m in (ref, model):
        with torch.autocast('cpu', dtype=torch.bfloat16):
            y = m(x)
        outs.append(y)
        grads.append(torch.autograd.grad(y.float().square().mean(), list(m.parameters())))
    assert outs[0].dtype == torch.bfloat16
    assert torch.equal(outs[0], outs[1])
    for (name, _), a, b in zip(ref.named_parameters(), *grads):
        # bf16 gradients carry their own ~0.4% rounding on top of the 8-bit error.
        assert_grad_close(a, b, name, rel_l2=0.05, cosine=0.998)


# ------------------------------------------------------------- layouts
def _non_contiguous(name, x):
    if name == 'conv2d':
        return x.contiguous(memory_format=torch.channels_last)
    return x.transpose(-1, -2).contiguous().transpose(-1, -2)


@pytest.mark.parametrize('name', ['linear', 'conv2d', 'layer_norm', 'gelu', 'softmax',
                                  'matmul', 'batch_norm'])
def test_non_contiguous_inputs(name):
    case = CASES[name]
    ref, model, leaves = case.build()
    xs = [_non_contiguous(name, x) for x in leaves]
    assert not all(x.is_contiguous() for x in xs)
    results = []
    for m in (ref, model):
        y = case.call(m, *xs)
        torch.manual_seed(1)
        results.append((y, torch.autograd.grad(y, leaves, torch.randn_like(y))))
    (y_ref, g_ref), (y, g) = results
    assert torch.equal(y, y_ref)
    for a, b in zip(g_ref, g):
        assert_grad_close(a, b, name)


# ------------------------------------------------------- rounding and ranges
def test_seeded_reproducibility(backend):
    # Same build seed and same step: bit-identical gradients. The next step of
    # the same model rounds with fresh noise.
    case = CASES['linear']
    grads = []
    for _ in range(2):
        ref, model, xs = case.build()
        torch.manual_seed(5)
        for _ in range(2):
            y = model(xs[0])
            grads.append(torch.autograd.grad(y, model.weight, torch.ones_like(y))[0])
    assert torch.equal(grads[0], grads[2]) and torch.equal(grads[1], grads[3])
    assert not torch.equal(grads[0], grads[1])


def test_constant_input_is_stored_exactly():
    # Zero range in every group: no NaN, and the dequantized copy is exact, so
    # the gradient equals torch's bit for bit.
    ref, model, _ = CASES['gelu'].build()
    x = torch.full((2, 16, 64), 0.75, requires_grad=True)
    g_ref = torch.autograd.grad(ref(x).sum(), x)[0]
    g = torch.autograd.grad(model(x).sum(), x)[0]
    assert torch.equal(g, g_ref)
    assert torch.equal(model.quantizer.running_range, torch.zeros(4))


def test_training_continues_after_an_outlier_batch():
    from mesa_seg.mesa import mesafy_
    torch.manual_seed(0)
    model = mesafy_(nn.Sequential(nn.LayerNorm(16), nn.Linear(16, 32), nn.GELU(),
                                  nn.Linear(32, 1)))
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    norm = model[0].quantizer
    losses = []
    for step in range(6):
        x = torch.randn(8, 16)
        if step == 3:
            x = x * 1e4 + 1e3  # far outside every running range
        with torch.no_grad():
            expected = model.eval()(x)
        y = model.train()(x)
        assert torch.equal(y, expected)  # the forward stays exact
        loss = y.square().mean()
        opt.zero_grad()
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters())
        opt.step()
        losses.append(loss.item())
        if step == 3:
            # The running range moved 1 - momentum of the way to the outlier's:
            # most of the batch saturated (clamped) instead of wrapping around.
            batch_range = (x.max() - x.min()).item()
            assert 0.09 * batch_range < norm.running_range.item() < 0.2 * batch_range
    assert all(torch.isfinite(torch.tensor(losses)))
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_saves_only_what_backward_needs():
    # Linear with a frozen weight needs only W for the input gradient: torch
    # saves no activation at all. MatMul where b needs no gradient needs only b.
    ref, model, (x,) = CASES['linear'].build()
    ref.requires_grad_(False)
    _, torch_bytes = saved_bytes(lambda: ref(x), list(ref.parameters()))
    _, mesa_bytes = saved_bytes(lambda: model.requires_grad_(False)(x),
                                list(model.parameters()))
    assert torch_bytes == 0 and mesa_bytes == 0
    ref, model, (a, b) = CASES['matmul'].build()
    b = b.detach()
    _, torch_bytes = saved_bytes(lambda: ref(a, b))
    _, mesa_bytes = saved_bytes(lambda: model(a, b))
    assert mesa_bytes <= 0.26 * torch_bytes


@pytest.mark.parametrize('quant_groups', [1, 2, 8])
@pytest.mark.parametrize('input_grad', [True, False])
def test_conv_backward_in_channel_blocks_matches_whole_input(monkeypatch, quant_groups,
                                                             input_grad):
    """Wide conv inputs are dequantized a channel block at a time in backward
    (``CONV_BACKWARD_CHUNK_BYTES``): same gradients as dequantizing them whole."""
    from mesa_seg.mesa import MesaConv2d, ops
    torch.manual_seed(0)
    ref = nn.Conv2d(8, 6, 3, stride=2, padding=2, dilation=2)
    x = torch.randn(3, 8, 11, 11, requires_grad=input_grad)
    gy = None
    grads = {}
    for chunk_bytes in (2**40, 1, 3 * 4 * 11 * 11 * 3):  # whole, one channel, 3 channels
        monkeypatch.setattr(ops, 'CONV_BACKWARD_CHUNK_BYTES', chunk_bytes)
        mesa = MesaConv2d.from_float(copy.deepcopy(ref), QuantizerConfig(
            groups=quant_groups, stochastic_rounding=False))
        y = mesa(x)
        gy = torch.randn_like(y) if gy is None else gy
        leaves = ([x] if input_grad else []) + [mesa.weight, mesa.bias]
        grads[chunk_bytes] = torch.autograd.grad(y, leaves, gy)
    whole = grads.pop(2**40)
    for blocked in grads.values():
        for a, b in zip(blocked, whole):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_channel_blocks_dequantize_to_the_whole_input():
    from mesa_seg.mesa import ops
    quant = ActivationQuantizer(QuantizerConfig(groups=4, stochastic_rounding=False), dim=1)
    x = torch.randn(2, 8, 5, 5)
    packed = quant.pack(x)
    whole = ActivationQuantizer.unpack(packed, x.shape, x.dtype)
    blocks = [ops._unpack_channels(packed, x.shape, x.dtype, c, min(8, c + 3))
              for c in range(0, 8, 3)]
    assert torch.equal(torch.cat(blocks, 1), whole)
    assert ops._channel_blocks(torch.Size((2, 2048, 128, 128)), torch.float32, 1) == 8
    assert ops._channel_blocks(torch.Size((2, 2048, 128, 128)), torch.float32, 4) == 1
    assert ops._channel_blocks(torch.Size((2, 96, 128, 128)), torch.float32, 1) == 1


@pytest.mark.parametrize('mode', ['reflect', 'replicate', 'circular'])
@pytest.mark.parametrize('layout', ['contiguous', 'channels_last', 'unbatched'])
def test_conv_padding_keeps_no_input_and_has_torch_gradient(mode, layout):
    # The pad before a Mesa conv: torch's output and input gradient bit for bit,
    # with nothing saved (torch's reflect/replicate keep their whole input).
    from mesa_seg.mesa import ops
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, 6)
    if layout == 'channels_last':
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == 'unbatched':
        x = x[0]
    x.requires_grad_(True)
    pad = (1, 2, 2, 1)
    y_ref = torch.nn.functional.pad(x, pad, mode=mode)
    y, nbytes = saved_bytes(lambda: ops.pad2d(x, pad, mode))
    assert torch.equal(y, y_ref) and nbytes == 0
    gy = torch.randn_like(y)
    assert torch.equal(torch.autograd.grad(y, x, gy)[0], torch.autograd.grad(y_ref, x, gy)[0])


@pytest.mark.parametrize('name', ['batch_norm', 'batch_norm_no_stats'])
def test_batch_norm_channels_last(name):
    # Backward runs in the forward's layout (cuDNN picks its mode from it).
    case = CASES[name]
    ref, model, (leaf,) = case.build()
    x = leaf.contiguous(memory_format=torch.channels_last)
    results = []
    for m in (ref, model):
        y = m(x)
        torch.manual_seed(1)
        results.append((y, torch.autograd.grad(y, [leaf, *m.parameters()], torch.randn_like(y))))
    (y_ref, g_ref), (y, g) = results
    assert torch.equal(y, y_ref)
    _assert_state_equal(ref, model)
    for i, (a, b) in enumerate(zip(g_ref, g)):
        assert_grad_close(a, b, f'{name} grad {i}')
