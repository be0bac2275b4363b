"""Per-op cost of Mesa vs torch: fwd+bwd time and bytes saved for backward.

Run ``python -m mesa_seg.benchmark.ops [--shapes swin_t_512|small] [--repeat N]
[--backend compile|eager] [--threads N]``. For every op it builds the torch
module, its Mesa twin (``mesafy_``, same weights) and random inputs at the
activation shapes of UperNet + Swin-T at 512², batch 2, then prints the median
forward, backward and total time of each (one warm-up call each first, which
also compiles the fused kernels) and the bytes autograd saves (unique
storages, parameters excluded, as :func:`mesa_seg.mesa.audit_saved_tensors`
counts them), with Mesa/torch ratios. Times on a shared CPU are noisy: read
the ratios.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..mesa import (MatMul, audit_saved_tensors, compile_failed, get_backend, mesafy_,
                    use_backend)

__all__ = ['OpSpec', 'SHAPES', 'OPS', 'bench_op', 'format_table', 'main']

# Swin-T at 512², batch 2: stage 1 has 128² tokens of 96 channels in 3 heads
# (head dim 32); 7x7 windows over the padded 133² map give 19² windows per image.
_SWIN_T_512 = dict(tokens=(2, 128 * 128), dim=96, heads=3, mlp=384,
                   windows=2 * 19 * 19, win=49, head_dim=32,
                   fmap=(2, 512, 128, 128))  # UPerHead: 512 channels at 1/4 scale
_SMALL = dict(tokens=(2, 256), dim=32, heads=2, mlp=128, windows=8, win=16, head_dim=16,
              fmap=(2, 16, 16, 16))
SHAPES: Dict[str, dict] = {'swin_t_512': _SWIN_T_512, 'small': _SMALL}


@dataclass(frozen=True)
class OpSpec:
    """One op: the torch module, its input shapes and Mesa groups."""
    make: Callable[[dict], nn.Module]
    inputs: Callable[[dict], Sequence[Tuple[int, ...]]]
    groups: Callable[[dict], int]
    where: str


def _tokens(s, channels):
    return [(*s['tokens'], channels)]


def _heads(s):
    return s['heads']


OPS: Dict[str, OpSpec] = {
    'linear': OpSpec(lambda s: nn.Linear(s['dim'], s['mlp']), lambda s: _tokens(s, s['dim']),
                     _heads, 'stage-1 MLP fc1'),
    'layer_norm': OpSpec(lambda s: nn.LayerNorm(s['dim']), lambda s: _tokens(s, s['dim']),
                         _heads, 'stage-1 norm'),
    'gelu': OpSpec(lambda s: nn.GELU(), lambda s: _tokens(s, s['mlp']), _heads,
                   'stage-1 MLP act'),
    'softmax': OpSpec(lambda s: nn.Softmax(dim=-1),
                      lambda s: [(s['windows'], s['heads'], s['win'], s['win'])], _heads,
                      'stage-1 window attention'),
    'matmul': OpSpec(lambda s: MatMul(),
                     lambda s: [(s['windows'], s['heads'], s['win'], s['head_dim']),
                                (s['windows'], s['heads'], s['head_dim'], s['win'])],
                     _heads, 'stage-1 q @ k^T'),
    'conv2d': OpSpec(lambda s: nn.Conv2d(s['fmap'][1], s['fmap'][1], 3, padding=1),
                     lambda s: [s['fmap']], lambda s: 1, 'UPerHead 3x3 conv'),
    'batch_norm': OpSpec(lambda s: nn.BatchNorm2d(s['fmap'][1]), lambda s: [s['fmap']],
                         lambda s: 1, 'UPerHead BN'),
    'relu': OpSpec(lambda s: nn.ReLU(), lambda s: [s['fmap']], lambda s: 1, 'UPerHead ReLU'),
}


def _saved_bytes(module: nn.Module, xs: Sequence[torch.Tensor]) -> int:
    return sum(r.nbytes for r in audit_saved_tensors(module, *xs))


def _time(module: nn.Module, xs: List[torch.Tensor], gy: torch.Tensor, repeat: int
          ) -> Tuple[float, float]:
    """Median forward and backward seconds over ``repeat`` runs after a warm-up."""
    wrt = xs + [p for p in module.parameters() if p.requires_grad]
    fwd, bwd = [], []
    for i in range(repeat + 1):
        t0 = time.perf_counter()
        y = module(*xs)
        t1 = time.perf_counter()
        torch.autograd.grad(y, wrt, gy)
        t2 = time.perf_counter()
        if i:  # the first call warms up (allocator, compilation)
            fwd.append(t1 - t0)
            bwd.append(t2 - t1)
        del y
    return statistics.median(fwd), statistics.median(bwd)


def bench_op(name: str, shapes: dict, repeat: int = 3, seed: int = 0) -> dict:
    """Time and saved bytes of torch and Mesa for op ``name`` at ``shapes``."""
    spec = OPS[name]
    torch.manual_seed(seed)
    ref = spec.make(shapes).train()
    mesa = mesafy_(copy.deepcopy(ref), dict(groups=spec.groups(shapes)))
    xs = [torch.randn(s, requires_grad=True) for s in spec.inputs(shapes)]
    with torch.no_grad():
        gy = torch.randn_like(ref(*xs))
    row = dict(op=name, where=spec.where, shape=' @ '.join('x'.join(map(str, x.shape))
                                                           for x in xs))
    for label, module in (('torch', ref), ('mesa', mesa)):
        row[label + '_fwd'], row[label + '_bwd'] = _time(module, xs, gy, repeat)
        row[label + '_bytes'] = _saved_bytes(module, xs)
    return row


def format_table(rows: List[dict]) -> str:
    """The results as a fixed-width table with Mesa/torch ratios (x)."""
    head = (f'{"op":<11}{"input shape":<27}{"torch ms":>9}{"mesa ms":>9}{"time x":>8}'
            f'{"fwd x":>7}{"bwd x":>7}{"torch MB":>10}{"mesa MB":>9}{"bytes x":>8}')
    lines = [head, '-' * len(head)]
    for r in rows:
        t_torch, t_mesa = r['torch_fwd'] + r['torch_bwd'], r['mesa_fwd'] + r['mesa_bwd']
        lines.append(
            f'{r["op"]:<11}{r["shape"][:26]:<27}{t_torch * 1e3:9.1f}{t_mesa * 1e3:9.1f}'
            f'{t_mesa / t_torch:8.2f}{r["mesa_fwd"] / r["torch_fwd"]:7.2f}'
            f'{r["mesa_bwd"] / r["torch_bwd"]:7.2f}{r["torch_bytes"] / 2**20:10.1f}'
            f'{r["mesa_bytes"] / 2**20:9.1f}{r["mesa_bytes"] / r["torch_bytes"]:8.3f}')
    lines.append('(ms: median fwd+bwd; x: Mesa / torch; MB: bytes autograd saves for '
                 'backward, parameters excluded)')
    return '\n'.join(lines)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--shapes', choices=sorted(SHAPES), default='swin_t_512',
                        help='activation shapes (default: swin_t_512)')
    parser.add_argument('--repeat', type=int, default=5,
                        help='timed runs per op and implementation, after one warm-up '
                             '(default: 5)')
    parser.add_argument('--backend', choices=('compile', 'eager'), default=None,
                        help='Mesa kernel backend (default: MESA_BACKEND or compile)')
    parser.add_argument('--threads', type=int, default=None,
                        help='torch CPU threads (default: torch default)')
    parser.add_argument('--ops', nargs='+', choices=list(OPS), default=list(OPS),
                        help='ops to run (default: all)')
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error('--repeat must be >= 1')
    return args


def main(argv: Optional[Sequence[str]] = None) -> List[dict]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    # Selected for the run only: a caller (a test) keeps its own backend.
    with use_backend(args.backend or get_backend()):
        return _run(args)


def _run(args: argparse.Namespace) -> List[dict]:
    print(f'Mesa op benchmark: shapes={args.shapes}, backend={get_backend()}, '
          f'repeat={args.repeat} (medians, warm-up excluded), torch {torch.__version__}, '
          f'{torch.get_num_threads()} CPU threads', flush=True)
    rows = []
    for name in args.ops:
        rows.append(bench_op(name, SHAPES[args.shapes], args.repeat))
        print(f'  {name} done', file=sys.stderr, flush=True)
    if get_backend() == 'compile' and compile_failed():
        print('WARNING: compiled kernels failed; Mesa ran the eager fallback')
    print(format_table(rows))
    return rows


if __name__ == '__main__':
    main()
