"""Issue 11, exact forward everywhere: in training, every Mesa op/module returns
exactly torch's output (``torch.equal``) on the same device and dtype.

Matrix: every Mesa layer type (the conv with each padding mode and groups)
x {fp32, bf16 autocast, fp16 autocast} (under autocast with an fp32 input, as
a network's fp32 residual stream gives it, and with an input already in the
autocast dtype, as an autocast op's output gives it) x {contiguous, transposed
(last dim strided), sliced, channels-last (4-D inputs)}, on CPU and, marked
``cuda``, on a GPU. The reference is the torch module with the same weights on
the same input; running statistics must match too.
"""
import contextlib
import copy
from dataclasses import dataclass, field
from typing import Callable, Tuple

import pytest
import torch
from torch import nn

from mesa_seg.mesa import LAYER_TYPES, MatMul, MesaModule, QuantizerConfig
from mesa_utils import eager_by_default  # noqa: F401  (fixture)


@dataclass
class Case:
    """A torch module, its input shapes and how to call it."""
    make: Callable[[], nn.Module]
    shapes: Tuple[Tuple[int, ...], ...]
    call: Callable = field(default=lambda mod, *xs: mod(*xs))
    input_grad: bool = True       # the inputs require grad
    frozen: Tuple[str, ...] = ()  # parameters that do not


def _self_attention(mod, x):
    return mod(x, x, x)


def _self_attention_fused(mod, x):
    return mod(x, x, x, need_weights=False)


def _cross_attention_batch_first(mod, q, kv):
    return mod(q, kv, kv)


CASES = {
    'linear': Case(lambda: nn.Linear(64, 32), ((2, 16, 64),)),
    'linear_no_bias': Case(lambda: nn.Linear(64, 32, bias=False), ((2, 16, 64),)),
    'linear_2d': Case(lambda: nn.Linear(64, 32), ((24, 64),)),
    'linear_4d': Case(lambda: nn.Linear(64, 32), ((2, 4, 4, 64),)),
    # matmul's kernel choice reads whether the weight requires grad, not the input
    'linear_input_no_grad': Case(lambda: nn.Linear(64, 32), ((2, 16, 64),), input_grad=False),
    'linear_frozen_weight': Case(lambda: nn.Linear(64, 32), ((2, 16, 64),),
                                 frozen=('weight', 'bias')),
    'conv2d': Case(lambda: nn.Conv2d(8, 16, 3, padding=1), ((2, 8, 10, 10),)),
    'conv2d_stride_dilation': Case(lambda: nn.Conv2d(8, 16, 3, stride=2, padding=2,
                                                     dilation=2), ((2, 8, 11, 11),)),
    'conv2d_grouped': Case(lambda: nn.Conv2d(8, 16, 3, padding=1, groups=4),
                           ((2, 8, 10, 10),)),
    'conv2d_depthwise': Case(lambda: nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False),
                             ((2, 8, 10, 10),)),
    'conv2d_reflect': Case(lambda: nn.Conv2d(8, 16, 3, padding=1, padding_mode='reflect'),
                           ((2, 8, 10, 10),)),
    # an even kernel's 'same' padding is asymmetric: torch pads 1 before, 2 after
    'conv2d_replicate_same_even': Case(lambda: nn.Conv2d(8, 8, 4, padding='same',
                                                         padding_mode='replicate'),
                                       ((2, 8, 10, 10),)),
    'conv2d_circular_grouped': Case(lambda: nn.Conv2d(8, 8, (3, 5), padding=(1, 2), groups=2,
                                                      padding_mode='circular'),
                                    ((2, 8, 10, 10),)),
    'layer_norm': Case(lambda: nn.LayerNorm(64, eps=1e-6), ((2, 16, 64),)),
    'layer_norm_no_affine': Case(lambda: nn.LayerNorm(64, elementwise_affine=False),
                                 ((2, 16, 64),)),
    'gelu': Case(lambda: nn.GELU(), ((2, 16, 64),)),
    'gelu_tanh': Case(lambda: nn.GELU(approximate='tanh'), ((2, 16, 64),)),
    'softmax': Case(lambda: nn.Softmax(dim=-1), ((2, 4, 16, 16),)),
    'matmul': Case(lambda: MatMul(), ((2, 4, 16, 8), (2, 4, 8, 16))),
    'matmul_broadcast': Case(lambda: MatMul(), ((1, 4, 16, 8), (2, 4, 8, 16))),
    'matmul_2d_rhs': Case(lambda: MatMul(), ((2, 4, 16, 64), (64, 32))),
    'batch_norm': Case(lambda: nn.BatchNorm2d(8), ((4, 8, 6, 6),)),
    'batch_norm_cumulative': Case(lambda: nn.BatchNorm2d(8, momentum=None), ((4, 8, 6, 6),)),
    'batch_norm_no_affine': Case(lambda: nn.BatchNorm2d(8, affine=False), ((4, 8, 6, 6),)),
    'batch_norm_no_stats': Case(lambda: nn.BatchNorm2d(8, track_running_stats=False),
                                ((4, 8, 6, 6),)),
    'relu': Case(lambda: nn.ReLU(), ((2, 8, 6, 6),)),
    'mha': Case(lambda: nn.MultiheadAttention(32, 4), ((6, 2, 32),), call=_self_attention),
    'mha_fused': Case(lambda: nn.MultiheadAttention(32, 4), ((6, 2, 32),),
                      call=_self_attention_fused),
    'mha_cross_batch_first': Case(lambda: nn.MultiheadAttention(32, 4, batch_first=True),
                                  ((2, 6, 32), (2, 10, 32)), call=_cross_attention_batch_first),
}

# name -> (autocast dtype or None, input dtype)
PRECISIONS = {
    'fp32': (None, torch.float32),
    'bf16_autocast': (torch.bfloat16, torch.float32),
    'bf16_autocast_bf16_input': (torch.bfloat16, torch.bfloat16),
    'fp16_autocast': (torch.float16, torch.float32),
    'fp16_autocast_fp16_input': (torch.float16, torch.float16),
}


def _layout(name: str, x: torch.Tensor) -> torch.Tensor:
    """``x``'s values in another memory layout (a non-leaf view when strided)."""
    if name == 'contiguous':
        return x
    if name == 'transposed':  # the last dim is not the fastest
        return x.transpose(-1, -2).contiguous().transpose(-1, -2)
    if name == 'sliced':  # every other row of a larger tensor
        return torch.stack([x, torch.full_like(x, float('nan'))], -2).flatten(-3, -2)[..., ::2, :]
    if name == 'channels_last':
        return x.contiguous(memory_format=torch.channels_last)
    raise KeyError(name)


def _layouts(case: Case):
    names = ['contiguous', 'transposed', 'sliced']
    if any(len(s) == 4 for s in case.shapes):
        names.append('channels_last')
    return names


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
DEVICES = [pytest.param('cpu'),
           pytest.param('cuda', marks=[pytest.mark.cuda, CUDA])]
MATRIX = [(name, layout) for name, case in CASES.items() for layout in _layouts(case)]


def _build(case: Case, device: str, input_dtype: torch.dtype, layout: str):
    torch.manual_seed(0)
    ref = case.make().to(device)
    for name in case.frozen:
        ref.get_parameter(name).requires_grad_(False)
    mesa_cls = next(m for t, m in LAYER_TYPES.values() if type(ref) is t)
    mesa = mesa_cls.from_float(copy.deepcopy(ref), QuantizerConfig(groups=2))
    leaves = [torch.randn(s, device=device, dtype=input_dtype, requires_grad=case.input_grad)
              for s in case.shapes]
    xs = [_layout(layout, x) if x.dim() == 4 or layout != 'channels_last' else x
          for x in leaves]
    if layout != 'contiguous':
        assert not all(x.is_contiguous() for x in xs), 'the layout changed nothing'
    return ref.train(), mesa.train(), xs


def _ran_mesa(y: torch.Tensor) -> bool:
    """Whether a Mesa autograd Function produced (part of) ``y``."""
    seen, todo = set(), [y.grad_fn]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if isinstance(node, torch.autograd.function.BackwardCFunction):
            return True
        todo.extend(next_fn for next_fn, _ in node.next_functions)
    return False


def _outputs(y):
    return [t for t in (y if isinstance(y, tuple) else (y,)) if t is not None]


@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('precision', PRECISIONS)
@pytest.mark.parametrize('name, layout', MATRIX)
def test_training_forward_is_bit_identical_to_torch(name, layout, precision, device):
    case = CASES[name]
    autocast_dtype, input_dtype = PRECISIONS[precision]
    ref, mesa, xs = _build(case, device, input_dtype, layout)
    autocast = (torch.autocast(device, dtype=autocast_dtype) if autocast_dtype is not None
                else contextlib.nullcontext())
    try:
        with autocast:
            y_ref = case.call(ref, *xs)
    except (NotImplementedError, RuntimeError) as err:  # e.g. no fp16 kernel on this CPU
        if autocast_dtype is None and input_dtype is torch.float32:
            raise
        pytest.skip(f'torch itself does not run {name} in {precision} on {device}: {err}')
    with autocast:
        y = case.call(mesa, *xs)
    outs_ref, outs = _outputs(y_ref), _outputs(y)
    assert isinstance(mesa, MesaModule) and _ran_mesa(outs[0]), 'the Mesa op did not run'
    assert len(outs) == len(outs_ref)
    for a, b in zip(outs_ref, outs):
        assert b.dtype == a.dtype and b.shape == a.shape
        differ = a != b
        assert torch.equal(a, b), (f'{int(differ.sum())} of {a.numel()} elements differ, max '
                                   f'{(a.float() - b.float()).abs().max().item():.3g}')
    for key, value in ref.state_dict().items():  # BatchNorm's running statistics
        assert torch.equal(mesa.state_dict()[key], value), key
