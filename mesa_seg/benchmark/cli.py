"""``tools/benchmark.py``: every memory-saving strategy on every model, one
fresh process per cell, written up as a leaderboard.

    python tools/benchmark.py [--models NAME|CONFIG ...] [--strategies NAME ...]
        [--size H W] [--batch B] [--steps N] [--warmup N] [--device cpu|cuda]
        [--sweep batch] [--threads N] [--timeout S] [--cpu-amp auto|run|skip]
        [--out DIR] [--cfg-options KEY=VALUE ...]

Writes ``OUT/leaderboard.{json,md}``, ``OUT/pareto_<model>.png``, each cell's
full measurement to ``OUT/cells/`` and each process's log to ``OUT/logs/``.
Exit code 1 if any cell failed (its row says why; the others still ran). On a
CPU without native bf16 the AMP cells are skipped, with the measured reason in
their rows (``--cpu-amp``).
"""
from __future__ import annotations

import argparse
import datetime
import glob
import json
import os
import os.path as osp
import shlex
import sys
import tempfile
import time
from typing import Callable, Dict, List, Optional, Tuple

from ..memory.measure import RunSpec, progress_units
from ..memory.sweep import largest_batch
from ..memory.worker import MeasurementError, run_isolated
from ..strategies import STRATEGIES
from .cells import REFERENCE, Cell, cell_spec, failed_row, result_row, skipped_row
from .leaderboard import build_leaderboard, model_section, write_json, write_markdown

__all__ = ['main', 'parse_args', 'resolve_models', 'run_cells']

DEFAULT_MODELS = ('upernet_swin', 'fpn_pvt')
#: ``--cpu-amp auto`` skips the AMP cells when bf16 is this many times slower
SLOW_BF16 = 8
_REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))


def _config_dirs() -> List[str]:
    return list(dict.fromkeys([osp.abspath('configs'), osp.join(_REPO, 'configs')]))


def _known_names() -> List[str]:
    names = set()
    for d in _config_dirs():
        names.update(osp.splitext(osp.basename(p))[0] for p in glob.glob(osp.join(d, '*.py')))
    return sorted(names)


def resolve_models(items: List[str]) -> List[Tuple[str, str]]:
    """``--models`` entries -> ``(name, config path)``: a name means
    ``configs/NAME.py``; anything ending in ``.py`` is a path.

    Raises:
        ValueError: a name or path that matches no file (the message lists the
            config names available).
    """
    from ..memory.cli import _names
    paths = []
    for item in items:
        if item.endswith('.py'):
            if not osp.isfile(item):
                raise ValueError(f'config file not found: {item}')
            paths.append(item)
            continue
        found = next((osp.join(d, item + '.py') for d in _config_dirs()
                      if osp.isfile(osp.join(d, item + '.py'))), None)
        if found is None:
            raise ValueError(f'unknown model {item!r}: not a config under configs/ '
                             f"(choose from: {', '.join(_known_names())}) nor a .py path")
        paths.append(found)
    paths = list(dict.fromkeys(paths))
    names = _names(paths)  # the file stem, or more of the path where stems clash
    return [(names[p], p) for p in paths]


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    from mmengine.config import DictAction
    choices = list(STRATEGIES)
    p = argparse.ArgumentParser(
        prog='benchmark.py',
        description='Peak memory, activation memory, step time and exactness of every '
        'memory-saving strategy on each model, one fresh process per cell, against fp32.')
    p.add_argument('--models', nargs='+', default=list(DEFAULT_MODELS), metavar='MODEL',
                   help='config names under configs/ (e.g. upernet_swin fpn_pvt) or '
                   f".py config paths (default: {' '.join(DEFAULT_MODELS)})")
    p.add_argument('--strategies', nargs='+', choices=choices, default=choices,
                   metavar='NAME', help='strategies to measure; fp32 is always measured '
                   f"first (default: all: {' '.join(choices)})")
    p.add_argument('--size', nargs=2, type=int, metavar=('H', 'W'),
                   help="input size (default: each config's crop size)")
    p.add_argument('--batch', type=int, default=2, help='images per step (default: 2)')
    p.add_argument('--steps', type=int, default=3, help='timed steps (default: 3)')
    p.add_argument('--warmup', type=int, default=1,
                   help='untimed steps first, >= 1; the first is compared with fp32 '
                   '(default: 1)')
    p.add_argument('--device', choices=['cpu', 'cuda'], default='cpu')
    p.add_argument('--cpu-amp', choices=['auto', 'run', 'skip'], default='auto',
                   help='CPU only: the AMP strategies train in bf16, and CPUs without '
                   'native bf16 (no AVX512-BF16/AMX) run bf16 convolutions and matrix '
                   'products in slow reference kernels. auto: measure that first and skip '
                   f'the AMP cells when bf16 is over {SLOW_BF16}x slower than fp32; run: '
                   'measure them anyway; skip: never (default: auto)')
    p.add_argument('--sweep', choices=['batch'],
                   help="also find each cell's largest batch within the fp32 cell's peak "
                   '(CUDA: reserved memory)')
    p.add_argument('--sweep-strategies', nargs='+', choices=choices, metavar='NAME',
                   help='sweep only these strategies (default: every measured one)')
    p.add_argument('--max-batch', type=int, default=256, help='sweep cap (default: 256)')
    p.add_argument('--max-probes', type=int, default=4,
                   help='sweep: at most this many probes per cell (default: 4)')
    p.add_argument('--threads', type=int, help="torch threads per cell (default: torch's)")
    p.add_argument('--seed', type=int, default=0, help='weights, batch, dropout (default: 0)')
    p.add_argument('--timeout', type=float, metavar='S',
                   help='seconds before a cell (or sweep probe) is killed (default: none)')
    p.add_argument('--out', default='reports/bench', help='output folder '
                   '(default: reports/bench)')
    p.add_argument('--cfg-options', nargs='+', action=DictAction, metavar='KEY=VALUE',
                   help='override settings of every config')
    args = p.parse_args(argv)
    try:
        args.model_paths = resolve_models(args.models)
    except ValueError as e:
        p.error(str(e))
    if min(args.batch, args.steps, args.warmup, args.max_batch, args.max_probes) < 1:
        p.error('--batch, --steps, --warmup, --max-batch and --max-probes must be >= 1')
    if args.size and min(args.size) < 1:
        p.error('--size must be positive')
    if args.timeout is not None and args.timeout <= 0:
        p.error('--timeout must be positive')
    if args.sweep_strategies and not args.sweep:
        p.error('--sweep-strategies needs --sweep batch')
    args.strategies = [REFERENCE] + [s for s in dict.fromkeys(args.strategies)
                                     if s != REFERENCE]
    return args


Runner = Callable[..., Dict]


def cpu_bf16_slowdown(repeat: int = 5) -> float:
    """How many times slower this CPU runs a small bf16 convolution and batched
    matrix product than fp32 (the larger ratio; fastest of ``repeat`` runs
    after one warm-up: on a loaded machine a median mixes in other processes'
    time slices and once let a 25x slowdown pass as under 8x)."""
    import torch
    import torch.nn.functional as F
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(2, 32, 24, 24, generator=g), torch.randn(32, 32, 3, 3, generator=g)
    a, b = torch.randn(16, 64, 64, generator=g), torch.randn(16, 64, 64, generator=g)

    def seconds(fn) -> float:
        times = []
        for _ in range(repeat + 1):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times[1:])

    ratios = []
    for op, args in ((lambda x, w: F.conv2d(x, w, padding=1), (x, w)), (torch.bmm, (a, b))):
        fp32 = seconds(lambda: op(*args))
        bf16_args = [t.to(torch.bfloat16) for t in args]
        ratios.append(seconds(lambda: op(*bf16_args)) / max(fp32, 1e-9))
    return max(ratios)


#: x86 CPU flags of native bf16 arithmetic (dot products / tile matrix units)
NATIVE_BF16_FLAGS = ('avx512_bf16', 'amx_bf16')


def cpu_native_bf16(cpuinfo: str = '/proc/cpuinfo') -> Optional[bool]:
    """Whether this x86 CPU has native bf16 arithmetic (from its flags), or
    None where the flags cannot be read (other OS or architecture)."""
    try:
        with open(cpuinfo) as f:
            flags = next((line.split(':', 1)[1].split() for line in f
                          if line.startswith('flags')), None)
    except OSError:
        return None
    if flags is None:
        return None
    return any(flag in flags for flag in NATIVE_BF16_FLAGS)


def amp_skip_reason(args) -> Optional[str]:
    """Why the AMP cells are not measured in this run, or None."""
    if args.device != 'cpu' or not any(STRATEGIES[s].amp for s in args.strategies):
        return None
    if args.cpu_amp == 'skip':
        return 'AMP on CPU skipped (--cpu-amp skip)'
    if args.cpu_amp == 'run':
        return None
    native = cpu_native_bf16()
    if native is not None:
        # The flags decide: a timing probe of small ops is at the mercy of the
        # machine's load (it once read 1.2x on a CPU whose bf16 runs 25x slower).
        return None if native else (
            f'this CPU has no native bf16 arithmetic (none of {", ".join(NATIVE_BF16_FLAGS)} '
            'in its flags): torch runs bf16 convolutions and matrix products in slow '
            'reference kernels, so an AMP step would take far longer than an fp32 one; '
            'measure AMP on a GPU, or pass --cpu-amp run')
    slowdown = cpu_bf16_slowdown()
    if slowdown <= SLOW_BF16:
        return None
    return (f'bf16 convolution/matmul ran {slowdown:.0f}x slower than fp32 on this CPU '
            '(no native bf16: torch falls back to slow reference kernels), so an AMP step '
            'would take far longer than an fp32 one; measure AMP on a GPU, or pass '
            '--cpu-amp run')


def _measure(run: Runner, spec: RunSpec, label: str, log: str, bar, timeout) -> Dict:
    def on_progress(phase: str) -> None:
        bar.set_postfix_str(f'{label}: {phase}', refresh=False)
        bar.update(1)

    bar.set_postfix_str(f'{label}: starting')
    return run(spec, log, on_progress, timeout)


def run_cells(cells: List[Cell], common: Dict, out: str, bar, timeout: Optional[float] = None,
              run: Runner = run_isolated,
              on_row: Callable[[List[Dict]], None] = lambda rows: None,
              skip: Optional[Dict[str, str]] = None) -> Tuple[List[Dict], Dict[Cell, Dict]]:
    """Measure every cell (fp32 cells first per model, see :func:`cell_spec`),
    each in a fresh process via ``run`` (:func:`~mesa_seg.memory.worker.run_isolated`);
    ``on_row(rows)`` after each; strategies in ``skip`` get a row saying why.

    Returns:
        tuple: the rows (failed cells included, with their error's last line)
        and the raw results of the cells that finished.
    """
    rows, raw = [], {}
    os.makedirs(osp.join(out, 'logs'), exist_ok=True)
    os.makedirs(osp.join(out, 'cells'), exist_ok=True)
    with tempfile.TemporaryDirectory(prefix='mesa-bench-') as scratch:
        for cell in cells:
            if skip and cell.strategy in skip:
                rows.append(skipped_row(cell, skip[cell.strategy]))
                on_row(rows)
                continue
            log = osp.join(out, 'logs', cell.tag + '.log')
            spec = cell_spec(cell, scratch, **common)
            try:
                result = _measure(run, spec, f'{cell.model}/{cell.strategy}', log, bar,
                                  timeout)
            except MeasurementError as e:
                rows.append(failed_row(cell, e.last_line, log))
                on_row(rows)
                continue
            except KeyboardInterrupt:  # the child is stopped; report what there is
                rows.append(failed_row(cell, 'interrupted (the rest was not measured)', log))
                on_row(rows)
                break
            result.update(model_name=cell.model, strategy=cell.strategy)
            with open(osp.join(out, 'cells', cell.tag + '.json'), 'w') as f:
                json.dump(result, f, indent=1)
            rows.append(result_row(cell, result, log))
            if not result.get('oom'):
                raw[cell] = result
            on_row(rows)
    return rows, raw


def sweep_cells(rows: List[Dict], raw: Dict[Cell, Dict], common: Dict, args, bar,
                run: Runner = run_isolated) -> None:
    """Largest batch of every finished cell whose peak stays within its model's
    fp32 cell's peak (CUDA: ``max_memory_reserved``), set in its row."""
    cuda = args.device == 'cuda'
    key = 'peak_reserved' if cuda else 'peak'
    by_cell = {Cell(r['model'], r['config'], r['strategy']): r for r in rows}
    only = set(getattr(args, 'sweep_strategies', None) or [c.strategy for c in raw])
    for cell, result in raw.items():
        if cell.strategy not in only:
            continue
        ref = next((v for c, v in raw.items()
                    if c.model == cell.model and c.is_reference), None)
        row = by_cell[cell]
        if ref is None or ref.get(key) is None:
            continue
        budget = ref[key]

        def probe(batch: int, cell=cell) -> Optional[int]:
            # CPU: warm up at --batch (known to run), not at the probed batch
            spec = RunSpec(**{**common, 'config': cell.config, 'strategy': cell.strategy,
                              'batch': batch, 'peak_only': True,
                              'warmup_batch': None if cuda else args.batch})
            bar.total = (bar.total or 0) + progress_units(spec)
            log = osp.join(args.out, 'logs', f'{cell.tag}_b{batch}_peak.log')
            found = _measure(run, spec, f'{cell.model}/{cell.strategy} b{batch}', log, bar,
                             args.timeout)
            return None if found.get('oom') else found[key]

        try:
            found = largest_batch(probe, budget, known={args.batch: result[key]},
                                  fixed=result.get('step_start'), max_batch=args.max_batch,
                                  max_probes=args.max_probes)
        except MeasurementError as e:
            row['sweep_error'] = e.last_line
            continue
        except KeyboardInterrupt:
            row['sweep_error'] = 'interrupted (the rest of the sweep was not run)'
            break
        row.update(max_batch=found.max_batch, max_batch_exact=found.exact)
        result['sweep'] = dict(max_batch=found.max_batch, exact=found.exact,
                               probes=found.probes, budget=budget,
                               peaks={str(b): p for b, p in sorted(found.peaks.items())})


def _machine(device: str, raw: Dict[Cell, Dict], threads: Optional[int]) -> Dict:
    from ..machine import describe_machine
    results = list(raw.values())
    return dict(describe_machine(device),
                torch_threads=threads or max((r.get('torch_threads', 0) for r in results),
                                             default=None),
                mesa_backend=next((r['mesa_backend'] for r in results
                                   if r.get('mesa_backend')), None),
                mesa_compile_failed=any(r.get('mesa_compile_failed') for r in results))


def main(argv: Optional[List[str]] = None, run: Runner = run_isolated) -> int:
    from tqdm import tqdm
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    common = dict(size=tuple(args.size) if args.size else None, steps=args.steps,
                  warmup=args.warmup, device=args.device, cfg_options=args.cfg_options,
                  threads=args.threads, seed=args.seed, batch=args.batch)
    reason = amp_skip_reason(args)
    skip = {s: reason for s in args.strategies if STRATEGIES[s].amp} if reason else {}
    if reason:
        print(f"benchmark.py: skipping {', '.join(skip)}: {reason}", file=sys.stderr)
    cells = [Cell(name, path, s) for name, path in args.model_paths for s in args.strategies]
    units = sum(progress_units(RunSpec(config=c.config, **common)) for c in cells
                if c.strategy not in skip)
    settings = dict(models={name: path for name, path in args.model_paths},
                    strategies=args.strategies, size=args.size, batch=args.batch,
                    steps=args.steps, warmup=args.warmup, device=args.device,
                    threads=args.threads, seed=args.seed, sweep=args.sweep,
                    sweep_strategies=args.sweep_strategies if args.sweep else None,
                    max_batch=args.max_batch if args.sweep else None,
                    max_probes=args.max_probes if args.sweep else None,
                    timeout=args.timeout, cfg_options=args.cfg_options,
                    cpu_amp=args.cpu_amp if args.device == 'cpu' else None)
    command = ' '.join(shlex.quote(a) for a in ['python', 'tools/benchmark.py'] + argv)

    def board_of(rows: List[Dict], raw: Dict[Cell, Dict]) -> Dict:
        return build_leaderboard(
            rows, _machine(args.device, raw, args.threads), settings, command=command,
            date=datetime.datetime.now().astimezone().isoformat(timespec='seconds'),
            cells_total=len(cells))

    def write_partial(rows: List[Dict]) -> None:
        # a run stopped half-way (time limit, interrupt) still leaves its figures
        board = board_of([dict(r) for r in rows], {})
        write_json(board, osp.join(args.out, 'leaderboard.json'))
        write_markdown(board, osp.join(args.out, 'leaderboard.md'))

    skipped = sum(c.strategy in skip for c in cells)
    desc = f'{len(cells) - skipped} cells' + (f' ({skipped} skipped)' if skipped else '')
    with tqdm(total=units, desc=desc, unit='step', dynamic_ncols=True) as bar:
        rows, raw = run_cells(cells, common, args.out, bar, args.timeout, run, write_partial,
                              skip)
        if args.sweep:
            bar.set_description('batch sweep')
            sweep_cells(rows, raw, common, args, bar, run)
            for cell, result in raw.items():  # with the sweep's probes
                with open(osp.join(args.out, 'cells', cell.tag + '.json'), 'w') as f:
                    json.dump(result, f, indent=1)

    board = board_of(rows, raw)
    from .plot import plot_file_name, plot_model
    plots = {}
    for name, _ in args.model_paths:
        if any(r['model'] == name and not r.get('error') and not r.get('skipped')
               for r in rows):
            plots[name] = plot_file_name(name)
            plot_model(board, name, osp.join(args.out, plots[name]))
    write_json(board, osp.join(args.out, 'leaderboard.json'))
    write_markdown(board, osp.join(args.out, 'leaderboard.md'), plots)

    for name, _ in args.model_paths:
        print('\n' + '\n'.join(model_section(board, name)))
    failed = [r for r in rows if r.get('error') or r.get('sweep_error')]
    for r in failed:
        what = r['error'] or f"batch sweep: {r['sweep_error']}"
        print(f"\nFAILED {r['model']} / {r['strategy']}: {what} (log: {r['log']})")
    print(f"\nleaderboard: {osp.join(args.out, 'leaderboard.md')} (+ leaderboard.json"
          + ''.join(f', {p}' for p in plots.values()) + f'); logs: {osp.join(args.out, "logs")}')
    return 1 if failed else 0
