"""Step-time ratios of strategies, their steps interleaved in one process.

``python tools/interleaved_time.py --model fpn_pvt --strategies fused_loss mesa``

Wall and CPU time on a shared machine drift by tens of percent within minutes
(other tenants, clock frequency): more than the differences between
strategies. The leaderboard times its cells one after another, so drift
enters its time ratios. Here every strategy's model is built in one process
(from the first one's initial weights, on the same synthetic batch) and their
training steps alternate in rounds, each round in the reverse order of the one
before (A B, B A, ...): drift hits all of them alike. A ratio is the median
over rounds of that round's step time over the first strategy's. Time only:
the leaderboard's memory figures are exact and need no repetition.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ..memory.measure import (RunSpec, build_training, input_channels, load_cfg,
                              load_initial_weights, save_initial_weights, synthetic_batch)
from ..strategies import STRATEGIES

__all__ = ['time_interleaved', 'format_result', 'main']


def _build(config: str, strategy: str, size: Tuple[int, int], batch: int, seed: int,
           weights: str, first: bool):
    cfg, hw = load_cfg(RunSpec(config=config, batch=batch, size=size, strategy=strategy,
                               seed=seed))
    torch.manual_seed(seed)
    model, optim_wrapper = build_training(cfg, 'cpu')
    if first:
        save_initial_weights(model, weights)
    else:
        load_initial_weights(model, weights)
    channels = input_channels(cfg)
    return model, optim_wrapper, synthetic_batch(model, batch, hw, seed, channels)


def time_interleaved(config: str, strategies: Sequence[str], size: Tuple[int, int],
                     batch: int = 2, rounds: int = 4, seed: int = 0,
                     threads: Optional[int] = None) -> Dict:
    """Time ``rounds`` training steps of each strategy, interleaved (see the
    module docstring); the first strategy is the reference of the ratios."""
    if len(strategies) < 2 or len(set(strategies)) != len(strategies):
        raise ValueError(f'need two or more distinct strategies, got {list(strategies)}')
    unknown = [s for s in strategies if s not in STRATEGIES]
    if unknown:
        raise ValueError(f'unknown strategies {unknown}: choose from {sorted(STRATEGIES)}')
    if rounds < 1:
        raise ValueError(f'rounds must be >= 1, got {rounds}')
    if threads:
        torch.set_num_threads(threads)
    runs = []
    with tempfile.TemporaryDirectory(prefix='mesa-interleaved-') as tmp:
        weights = os.path.join(tmp, 'init.pt')
        for i, name in enumerate(strategies):
            model, optim_wrapper, data = _build(config, name, size, batch, seed, weights, i == 0)
            torch.manual_seed(seed)
            model.train_step(data, optim_wrapper)  # warm-up: optimizer state, kernels
            runs.append((name, model, optim_wrapper, data))
    wall: Dict[str, List[float]] = {name: [] for name in strategies}
    cpu: Dict[str, List[float]] = {name: [] for name in strategies}
    for r in range(rounds):
        for name, model, optim_wrapper, data in (runs if r % 2 == 0 else runs[::-1]):
            t0, c0 = time.perf_counter(), time.process_time()
            model.train_step(data, optim_wrapper)
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    ref = strategies[0]

    def ratios(times):
        return {name: statistics.median(t / r for t, r in zip(times[name], times[ref]))
                for name in strategies}

    return dict(config=config, strategies=list(strategies), size=list(size), batch=batch,
                rounds=rounds, threads=torch.get_num_threads(), wall=wall, cpu=cpu,
                wall_ratio=ratios(wall), cpu_ratio=ratios(cpu))


def format_result(result: Dict) -> str:
    """A markdown table: median step times and median per-round ratios."""
    ref = result['strategies'][0]
    lines = [f"{result['config']}, {result['size'][0]}x{result['size'][1]}, batch "
             f"{result['batch']}, {result['rounds']} interleaved rounds, "
             f"{result['threads']} threads; ratios to `{ref}` (median of per-round ratios)",
             '', '| strategy | step wall, s | x | step CPU time, s | x | per-round wall ratios |',
             '| --- | ---: | ---: | ---: | ---: | --- |']
    for name in result['strategies']:
        per_round = [w / r for w, r in zip(result['wall'][name], result['wall'][ref])]
        lines.append(
            f"| `{name}` | {statistics.median(result['wall'][name]):.2f} | "
            f"{result['wall_ratio'][name]:.3f} | {statistics.median(result['cpu'][name]):.2f} | "
            f"{result['cpu_ratio'][name]:.3f} | {', '.join(f'{x:.3f}' for x in per_round)} |")
    return '\n'.join(lines)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--model', required=True,
                        help='config name under configs/ (e.g. fpn_pvt) or a .py path')
    parser.add_argument('--strategies', nargs='+', required=True, metavar='NAME',
                        help='the first is the reference (e.g. fused_loss mesa)')
    parser.add_argument('--size', nargs=2, type=int, metavar=('H', 'W'), default=(512, 512))
    parser.add_argument('--batch', type=int, default=2)
    parser.add_argument('--rounds', type=int, default=4, help='timed steps per strategy')
    parser.add_argument('--threads', type=int, default=None)
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--out', default=None, help='also write the result as JSON here')
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    import json

    from ..machine import describe_machine
    from .cli import resolve_models
    args = parse_args(argv)
    [(_, config)] = resolve_models([args.model])
    result = time_interleaved(config, args.strategies, tuple(args.size), args.batch,
                              args.rounds, args.seed, args.threads)
    result['machine'] = describe_machine('cpu')
    print(format_result(result))
    if args.out:
        with open(args.out, 'w') as f:
            json.dump(result, f, indent=1)
    return 0
