"""``tools/memory_report.py``: Mesa vs full-precision training memory, side by side.

    python tools/memory_report.py CONFIG [CONFIG ...] --baseline CONFIG
        [--strategy NAME] [--baseline-strategy NAME]
        [--size H W] [--batch B] [--steps N] [--device cpu|cuda] [--out DIR]
        [--sweep batch] [--budget-mb MB] [--cfg-options KEY=VALUE ...]

Each config is measured in a fresh process (:mod:`.worker`); the report goes to
``OUT/report.{md,json,png}`` and each process's log to ``OUT/logs/``.
``--strategy`` / ``--baseline-strategy`` apply a :mod:`mesa_seg.strategies`
strategy to the measured configs / the baseline, e.g. ``mesa`` against
``fused_loss`` on the same config: Mesa's own saving, with the same loss function
(Mesa also keeps its logits in 8 bits).
"""
from __future__ import annotations

import argparse
import datetime
import os
import os.path as osp
import re
import shlex
import sys
from typing import Dict, List, Optional, Tuple

from ..strategies import add_strategy_argument
from .measure import RunSpec, progress_units
from .meters import RSS_MALLOC
from .report import MiB, add_ratios, main_table, write_json, write_markdown
from .sweep import largest_batch
from .worker import MeasurementError, run_isolated

__all__ = ['main', 'parse_args']

_PRECISION = {'OptimWrapper': 'fp32', 'AmpOptimWrapper': 'fp16 AMP',
              'CPUAmpOptimWrapper': 'bf16 autocast'}


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    from mmengine.config import DictAction
    p = argparse.ArgumentParser(
        prog='memory_report.py',
        description='Peak training memory, activation memory (by part and op) and step '
        'time of configs vs a baseline, each measured in a fresh process.')
    p.add_argument('configs', nargs='+', metavar='CONFIG', help='configs to measure')
    p.add_argument('--baseline', required=True, metavar='CONFIG',
                   help='the config every ratio is relative to')
    p.add_argument('--size', nargs=2, type=int, metavar=('H', 'W'),
                   help="input size (default: each config's crop size)")
    p.add_argument('--batch', type=int, default=2, help='images per step (default: 2)')
    p.add_argument('--steps', type=int, default=3, help='timed steps (default: 3)')
    p.add_argument('--warmup', type=int, default=1,
                   help='untimed steps first, >= 1 (default: 1)')
    p.add_argument('--device', choices=['cpu', 'cuda'], default='cpu')
    p.add_argument('--out', default='reports/memory', help='output folder '
                   '(default: reports/memory)')
    p.add_argument('--sweep', choices=['batch'],
                   help='also find the largest batch each config fits in the budget')
    p.add_argument('--budget-mb', type=float, metavar='MB',
                   help="sweep budget in MiB (default: the baseline's peak at --batch)")
    p.add_argument('--max-batch', type=int, default=256, help='sweep cap (default: 256)')
    p.add_argument('--max-probes', type=int, default=6,
                   help='sweep: at most this many measurements per config (default: 6)')
    p.add_argument('--threads', type=int, help='torch threads in each measurement '
                   "(default: torch's default)")
    p.add_argument('--cfg-options', nargs='+', action=DictAction, metavar='KEY=VALUE',
                   help='override settings of every config, e.g. model.backbone.depths=[2,2,2,2]')
    add_strategy_argument(p, what='the measured CONFIGs')
    add_strategy_argument(p, '--baseline-strategy', what='the baseline')
    args = p.parse_args(argv)
    for path in [args.baseline] + args.configs:
        if not osp.isfile(path):
            p.error(f'config file not found: {path}')
    if min(args.batch, args.steps, args.warmup) < 1:
        p.error('--batch, --steps and --warmup must be >= 1')
    if args.size and min(args.size) < 1:
        p.error('--size must be positive')
    if args.budget_mb is not None and not args.sweep:
        p.error('--budget-mb needs --sweep batch')
    return args


def _names(paths: List[str]) -> Dict[str, str]:
    """A short unique name per config: the file stem, or more of its path."""
    names: Dict[str, str] = {}
    for depth in range(1, 10):
        names = {p: '/'.join(osp.splitext(osp.normpath(p))[0].split(os.sep)[-depth:])
                 for p in paths}
        if len(set(names.values())) == len(paths):
            break
    return names


def _environment(results: List[Dict], device: str) -> Dict:
    from ..machine import describe_machine
    precisions = sorted({r['model'].get('precision') or _PRECISION.get(
        r['model']['optim_wrapper'], r['model']['optim_wrapper'])
        for r in results if r.get('model')})
    return dict(describe_machine(device),
                torch_threads=max((r.get('torch_threads', 0) for r in results), default=0),
                precision=' / '.join(precisions) or 'fp32', rss_malloc=dict(RSS_MALLOC),
                mesa_backend=next((r['mesa_backend'] for r in results if 'mesa_backend' in r),
                                  None),
                mesa_compile_failed=any(r.get('mesa_compile_failed') for r in results))


def _file_tag(name: str) -> str:
    """``'configs/x [mesa]'`` -> ``'configs_x_mesa'``: safe in a file name."""
    return re.sub(r'[^\w.-]+', '_', name).strip('_')


def _entries(args) -> List[Tuple[str, Optional[str]]]:
    """``(config, strategy)`` to measure, the baseline first; a config equal to
    the baseline (same file, same strategy) is measured once."""
    base = (args.baseline, args.baseline_strategy)
    return [base] + [e for e in dict.fromkeys((c, args.strategy) for c in args.configs)
                     if e != base]


def _entry_names(entries: List[Tuple[str, Optional[str]]]) -> List[str]:
    """A unique label per entry: the config's short name, plus ``[strategy]``."""
    stems = _names(list(dict.fromkeys(p for p, _ in entries)))
    return [stems[p] + (f' [{s}]' if s else '') for p, s in entries]


def _run(spec: RunSpec, name: str, log_dir: str, bar) -> Dict:
    def on_progress(phase: str) -> None:
        bar.set_postfix_str(f'{name}: {phase}', refresh=False)
        bar.update(1)

    tag = f'{_file_tag(name)}_b{spec.batch}' + ('_peak' if spec.peak_only else '')
    bar.set_postfix_str(f'{name}: starting')
    return run_isolated(spec, osp.join(log_dir, tag + '.log'), on_progress)


def main(argv: Optional[List[str]] = None) -> int:
    from tqdm import tqdm
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    entries = _entries(args)
    names = _entry_names(entries)
    log_dir = osp.join(args.out, 'logs')
    os.makedirs(log_dir, exist_ok=True)
    common = dict(size=tuple(args.size) if args.size else None, steps=args.steps,
                  warmup=args.warmup, device=args.device, cfg_options=args.cfg_options,
                  threads=args.threads)
    specs = [RunSpec(config=p, batch=args.batch, strategy=st, **common)
             for p, st in entries]

    results = []
    try:
        with tqdm(total=sum(progress_units(s) for s in specs), desc='measuring',
                  unit='step', dynamic_ncols=True) as bar:
            for (path, strategy), name, spec in zip(entries, names, specs):
                r = _run(spec, name, log_dir, bar)
                r.update(name=name, config=path, strategy=strategy)
                results.append(r)
        baseline = results[0]
        if baseline.get('oom'):
            raise MeasurementError(f'the baseline {args.baseline} runs out of memory at '
                                   f'batch {args.batch}')
        budget = None
        if args.sweep:
            budget = args.budget_mb * MiB if args.budget_mb else baseline['peak']
            _sweep(results, specs, budget, args, log_dir, tqdm)
    except MeasurementError as e:
        print(f'memory_report.py: error: {e}', file=sys.stderr)
        return 1

    add_ratios(results, baseline)
    report = dict(
        command=' '.join(shlex.quote(a) for a in ['python', 'tools/memory_report.py'] + argv),
        date=datetime.datetime.now().astimezone().isoformat(timespec='seconds'),
        baseline=baseline['name'],
        environment=_environment(results, args.device),
        settings=dict(batch=args.batch, size=args.size, steps=args.steps, warmup=args.warmup,
                      device=args.device, strategy=args.strategy,
                      baseline_strategy=args.baseline_strategy, threads=args.threads,
                      cfg_options=args.cfg_options,
                      sweep=args.sweep, budget=budget,
                      budget_source=None if budget is None else (
                          '--budget-mb' if args.budget_mb else
                          f"the baseline's peak at batch {args.batch}"),
                      max_batch=args.max_batch, max_probes=args.max_probes),
        results=results)
    write_json(report, osp.join(args.out, 'report.json'))
    write_markdown(report, osp.join(args.out, 'report.md'))
    from .plot import plot_report
    plot_report(report, osp.join(args.out, 'report.png'))
    print('\n'.join(main_table(results, baseline, budget)))
    print(f"\nreport: {osp.join(args.out, 'report.md')} (+ report.json, report.png)")
    return 0


def _sweep(results: List[Dict], specs: List[RunSpec], budget: float, args, log_dir: str,
           tqdm) -> None:
    cpu = args.device == 'cpu'
    with tqdm(desc=f'batch sweep (≤ {budget / MiB:,.0f} MiB)', unit='step',
              dynamic_ncols=True) as bar:
        for r, spec in zip(results, specs):
            if r.get('oom'):
                continue

            def probe(batch: int, spec=spec, name=r['name']) -> Optional[int]:
                # CPU: warm up at --batch (known to run), not at the probed batch.
                probe_spec = RunSpec(**{**spec.__dict__, 'batch': batch, 'peak_only': True,
                                        'warmup_batch': spec.batch if cpu else None})
                bar.total = (bar.total or 0) + progress_units(probe_spec)
                return _run(probe_spec, name, log_dir, bar)['peak']

            found = largest_batch(probe, budget, known={spec.batch: r['peak']},
                                  fixed=r['step_start'], max_batch=args.max_batch,
                                  max_probes=args.max_probes)
            r['sweep'] = dict(max_batch=found.max_batch, exact=found.exact,
                              probes=found.probes,
                              peaks={str(b): p for b, p in sorted(found.peaks.items())})
