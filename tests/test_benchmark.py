"""tools/benchmark.py and mesa_seg.benchmark: rows, ratios, leaderboard files,
failures, the CUDA batch sweep's budget, and end to end on the tiny config."""
import json
import os
import os.path as osp
import subprocess
import sys

import pytest
import torch

from mesa_seg.benchmark import cli
from mesa_seg.benchmark.cells import Cell, failed_row, result_row
from mesa_seg.benchmark.leaderboard import build_leaderboard, write_json, write_markdown
from mesa_seg.memory.measure import compare_captures
from mesa_seg.memory.worker import MeasurementError

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
TINY = osp.join(REPO, 'tests', 'data', 'tiny_upernet_swin.py')
MiB = 1024 ** 2

# Written out here, not taken from the code under test.
ROW_KEYS = {
    'model', 'config', 'strategy', 'reference', 'includes', 'loss', 'checkpointing',
    'precision', 'segmentor', 'backbone', 'mesa_layers', 'peak_mib', 'peak_reserved_mib',
    'step_start_mib', 'activation_mib', 'activation_8bit_mib', 'activation_by_part',
    'step_s', 'step_cpu_s', 'max_batch', 'max_batch_exact', 'grad_cosine', 'grad_exact',
    'forward_exact', 'forward_dtype', 'forward_max_abs_diff', 'same_initial_weights',
    'mesa_backend', 'mesa_compile_failed', 'ratios', 'error', 'sweep_error', 'skipped', 'log'}
MACHINE = dict(device_name='test CPU', torch='2.x', mmseg='1.2.2', mmengine='0.10.7',
               python='3.11', cpu_count=2, torch_threads=2, mesa_backend='eager')


def _result(peak, act, step, *, loss='fused resize + CE', cp=False, precision='fp32',
            mesa_layers=0, batch=2, **extra):
    """A measurement result as mesa_seg.memory.measure returns it (MiB, s)."""
    return dict(
        spec=dict(batch=batch), oom=False, peak=peak * MiB, step_start=300 * MiB,
        step_time=dict(median=step, all=[step]), step_cpu_time=dict(median=2 * step, all=[2 * step]),
        activation=dict(total=act * MiB, compressed=0, uncompressed=act * MiB,
                        by_part={'backbone.stage1': dict(compressed=0,
                                                         uncompressed=act * MiB / 2),
                                 'loss': dict(compressed=0, uncompressed=act * MiB / 2)}),
        model=dict(loss=loss, checkpointing=cp, precision=precision, segmentor='S',
                   backbone='B', mesa_layers=mesa_layers),
        mesa_backend='eager', mesa_compile_failed=False, **extra)


MMSEG = "mmseg's CE (upsample, then CE)"
FIGURES = {  # strategy: peak MiB, activation MiB, step s
    'fp32': (2000, 800, 10.0), 'fused_loss': (1800, 600, 10.0), 'cp': (1500, 520, 12.5),
    'mesa': (1200, 160, 12.0)}


def _rows():
    rows = []
    for s, (peak, act, step) in FIGURES.items():
        extra = {} if s == 'fp32' else dict(grad_cosine=0.99998, grad_exact=s == 'cp',
                                             forward_exact=True, forward_dtype='float32',
                                             forward_max_abs_diff=0.0, weights={})
        rows.append(result_row(Cell('m', 'configs/m.py', s), _result(
            peak, act, step, loss=MMSEG if s in ('fp32', 'cp') else 'fused resize + CE',
            cp=s == 'cp', mesa_layers=10 if s == 'mesa' else 0, **extra), log=f'{s}.log'))
    rows.append(failed_row(Cell('m', 'configs/m.py', 'sac'), 'RuntimeError: boom', 'sac.log'))
    return rows


def test_leaderboard_json_and_markdown(tmp_path):
    board = build_leaderboard(_rows(), MACHINE, dict(size=[256, 256], batch=2, steps=2,
                                                      warmup=1, seed=0, device='cpu',
                                                      sweep=None),
                              'python tools/benchmark.py --models m', '2026-01-01')
    write_json(board, str(tmp_path / 'leaderboard.json'))
    write_markdown(board, str(tmp_path / 'leaderboard.md'), {'m': 'pareto_m.png'})
    doc = json.loads((tmp_path / 'leaderboard.json').read_text())
    assert {'rows', 'machine', 'settings', 'command'} <= set(doc)
    rows = {r['strategy']: r for r in doc['rows']}
    assert list(rows) == ['fp32', 'fused_loss', 'cp', 'mesa', 'sac']
    for r in doc['rows']:
        assert set(r) == ROW_KEYS
    fp32, mesa, sac = rows['fp32'], rows['mesa'], rows['sac']
    assert fp32['reference'] is True and fp32['grad_cosine'] == 1.0 and fp32['forward_exact']
    assert mesa['reference'] is False and mesa['grad_cosine'] == 0.99998
    assert (mesa['peak_mib'], mesa['activation_mib'], mesa['step_s']) == (1200, 160, 12.0)
    assert mesa['ratios']['peak'] == pytest.approx(1200 / 2000)
    assert mesa['ratios']['activation'] == pytest.approx(160 / 800)
    assert mesa['ratios']['step_time'] == pytest.approx(12.0 / 10.0)
    assert mesa['activation_by_part'] == {'backbone.stage1': 80.0, 'loss': 80.0}
    assert sac['error'] == 'RuntimeError: boom' and sac['peak_mib'] is None
    assert all(v is None for v in sac['ratios'].values())
    summary = doc['summary']['m']
    assert summary['mesa_vs_fused_loss'] == pytest.approx(
        dict(activation=160 / 600, peak=1200 / 1800, step_time=12.0 / 10.0))
    assert summary['mesa_vs_cp'] == pytest.approx(dict(peak=1200 / 1500, step_time=12.0 / 12.5))
    # fp32 is beaten by fused_loss (lower peak, same time), cp by mesa (both)
    assert summary['pareto_front'] == ['mesa', 'fused_loss']
    assert doc['failed'] == 1

    md = (tmp_path / 'leaderboard.md').read_text()
    assert "- Mesa's own saving (mesa vs fused_loss, same loss function): activation 0.27×, " \
        'peak 0.67×, step time 1.20×' in md
    assert '- mesa vs cp: peak 0.80×, step time 0.96×' in md
    assert '`mesa`, `fused_loss`' in md
    assert '| `mesa` | fused resize + CE | B, 10 Mesa layers | none | fp32 | 1,200 (0.60×) | ' \
        '160 (0.20×) | 12.00 (1.20×) | 24.00 (1.20×) | 0.999980 | yes |' in md
    assert "| `cp` | mmseg's CE (upsample, then CE) | B | every block | fp32 | 1,500 (0.75×) " \
        '| 520 (0.65×) | 12.50 (1.25×) | 25.00 (1.25×) | 0.999980 (bit-identical) | yes |' in md
    assert '| `fp32` | ' in md and '2,000 (ref.)' in md and 'reference | reference |' in md
    assert '| m | `sac` | RuntimeError: boom | `sac.log` |' in md
    assert 'python tools/benchmark.py --models m' in md and 'test CPU' in md
    assert '![m: peak memory vs step time](pareto_m.png)' in md


def test_out_of_memory_cell_and_partial_board():
    row = result_row(Cell('m', 'configs/m.py', 'amp'),
                     dict(oom=True, peak=None, spec=dict(batch=8)), log='amp.log')
    assert row['error'] == 'out of memory at batch 8'
    assert row['peak_mib'] is None and row['grad_cosine'] is None
    rows = _rows()[:2]
    board = build_leaderboard(rows, MACHINE, dict(size=None, batch=2, steps=3, warmup=1,
                                                  seed=0, device='cuda', sweep=None),
                              'cmd', cells_total=5)
    from mesa_seg.benchmark.leaderboard import markdown_lines
    md = '\n'.join(markdown_lines(board))
    assert '**Partial**: 2 of 5 cells measured so far' in md
    assert 'peak reserved, MiB' in md  # CUDA boards show the reserved peak too


def test_worker_errors_in_one_line(tmp_path):
    from mesa_seg.memory.measure import RunSpec
    from mesa_seg.memory.worker import error_line, run_isolated
    tail = ['Traceback (most recent call last):\n', '  File "x.py", line 1\n',
            'torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB\n',
            '[W1203 08:00:00] some shutdown noise\n', '\n']
    assert error_line(tail) == 'torch.OutOfMemoryError: CUDA out of memory. Tried to ' \
        'allocate 2.00 GiB'
    assert error_line(['just this\n']) == 'just this'
    # a hung (here: slow) child is killed at the timeout
    with pytest.raises(MeasurementError) as err:
        run_isolated(RunSpec(config=TINY), str(tmp_path / 'log.txt'), timeout=0.5)
    assert err.value.last_line == 'timed out after 0.5 s (killed)'


def test_compare_captures(tmp_path):
    ref = dict(grads={'a': torch.tensor([1.0, 0.0]), 'b': torch.tensor([0.0]),
                      'frozen': None},
               decode_head=torch.ones(1, 2, 2, 2))
    own = dict(grads={'a': torch.tensor([1.0, 1.0]), 'b': torch.tensor([0.0]),
                      'frozen': None},
               decode_head=torch.ones(1, 2, 2, 2))
    torch.save(ref, tmp_path / 'ref.pt')
    torch.save(own, tmp_path / 'own.pt')
    found = compare_captures(str(tmp_path / 'own.pt'), str(tmp_path / 'ref.pt'))
    assert found['grad_cosine'] == pytest.approx(1 / 2 ** 0.5)
    assert found['grad_exact'] is False and found['forward_exact'] is True
    assert found['forward_max_abs_diff'] == 0.0
    torch.save(ref, tmp_path / 'same.pt')
    same = compare_captures(str(tmp_path / 'same.pt'), str(tmp_path / 'ref.pt'))
    assert same['grad_exact'] is True and same['grad_cosine'] == pytest.approx(1.0)
    # same values in another dtype are not an exact forward
    own['decode_head'] = torch.ones(1, 2, 2, 2, dtype=torch.bfloat16)
    torch.save(own, tmp_path / 'bf16.pt')
    found = compare_captures(str(tmp_path / 'bf16.pt'), str(tmp_path / 'ref.pt'))
    assert found['forward_exact'] is False and found['forward_dtype'] == 'bfloat16'


def test_parse_args_models_and_strategies(capsys):
    args = cli.parse_args(['--models', 'upernet_swin', TINY, '--strategies', 'mesa', 'cp'])
    assert args.model_paths == [('upernet_swin', osp.join(REPO, 'configs', 'upernet_swin.py')),
                                ('tiny_upernet_swin', TINY)]
    assert args.strategies == ['fp32', 'mesa', 'cp']  # fp32 always, first
    assert cli.parse_args([]).strategies == ['fp32', 'fused_loss', 'amp', 'cp', 'sac',
                                             'mesa', 'mesa_amp', 'mesa_cp']
    with pytest.raises(SystemExit) as exit_:
        cli.parse_args(['--models', 'upernet_swim'])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "unknown model 'upernet_swim'" in err
    assert 'upernet_swin,' in err and 'fpn_pvt,' in err  # the choices
    with pytest.raises(SystemExit):
        cli.parse_args(['--strategies', 'int8'])


class FakeRunner:
    """Stands in for run_isolated: hand-written results, one injected failure;
    records the specs it got and writes the reference cell's files."""

    def __init__(self, fail=(), peaks=None):
        self.specs, self.fail, self.peaks = [], set(fail), peaks

    def __call__(self, spec, log, on_progress, timeout):
        self.specs.append(spec)
        on_progress('build')
        if spec.strategy in self.fail:
            raise MeasurementError('long message\nwith a traceback',
                                   'RuntimeError: injected failure')
        for path in (spec.weights_out, spec.capture_out):
            if path:
                open(path, 'w').close()
        if self.peaks:  # the sweep test: peak and reserved bytes as functions of batch
            alloc, reserved = self.peaks[spec.strategy]
            return _result(alloc(spec.batch), 100, 1.0, batch=spec.batch,
                           peak_reserved=reserved(spec.batch) * MiB)
        peak, act, step = FIGURES[spec.strategy]
        extra = {} if spec.strategy == 'fp32' else dict(grad_cosine=0.9, forward_exact=True)
        return _result(peak, act, step, **extra)


def test_failed_cell_reported_others_complete(tmp_path, capsys):
    run = FakeRunner(fail={'cp'})
    out = str(tmp_path / 'out')
    code = cli.main(['--models', TINY, '--strategies', 'mesa', 'cp', 'fused_loss',
                     '--out', out], run=run)
    assert code == 1
    doc = json.loads(open(osp.join(out, 'leaderboard.json')).read())
    rows = {r['strategy']: r for r in doc['rows']}
    assert list(rows) == ['fp32', 'mesa', 'cp', 'fused_loss']
    assert rows['cp']['error'] == 'RuntimeError: injected failure'
    assert rows['cp']['peak_mib'] is None
    for s in ('fp32', 'mesa', 'fused_loss'):
        assert rows[s]['error'] is None and rows[s]['peak_mib'] == FIGURES[s][0]
    assert doc['summary']['tiny_upernet_swin']['mesa_vs_cp'] is None
    md = open(osp.join(out, 'leaderboard.md')).read()
    assert 'RuntimeError: injected failure' in md and 'mesa vs cp: not measured' in md
    assert os.path.getsize(osp.join(out, 'pareto_tiny_upernet_swin.png')) > 10_000
    printed = capsys.readouterr().out
    assert 'FAILED tiny_upernet_swin / cp: RuntimeError: injected failure' in printed
    # the fp32 cell writes the initial weights and its capture; the others read them
    first = run.specs[0]
    assert first.strategy == 'fp32' and first.weights_out and first.capture_out
    assert first.weights_in is None and first.compare_to is None
    for spec in run.specs[1:]:
        assert (spec.weights_in, spec.compare_to) == (first.weights_out, first.capture_out)
        assert spec.weights_out is None and spec.capture_out is None


def test_amp_cells_skipped_on_a_cpu_without_bf16(tmp_path, monkeypatch):
    run = FakeRunner()
    out = str(tmp_path / 'out')
    monkeypatch.setattr(cli, 'cpu_native_bf16', lambda: None)  # flags unreadable
    monkeypatch.setattr(cli, 'cpu_bf16_slowdown', lambda: 50.0)
    code = cli.main(['--models', TINY, '--strategies', 'amp', 'mesa', 'mesa_amp',
                     '--out', out], run=run)
    assert code == 0  # skipped on purpose is not a failure
    assert [s.strategy for s in run.specs] == ['fp32', 'mesa']
    doc = json.load(open(osp.join(out, 'leaderboard.json')))
    rows = {r['strategy']: r for r in doc['rows']}
    assert list(rows) == ['fp32', 'amp', 'mesa', 'mesa_amp']
    for s in ('amp', 'mesa_amp'):
        assert rows[s]['skipped'].startswith('bf16 convolution/matmul ran 50x slower than '
                                             'fp32 on this CPU')
        assert rows[s]['error'] is None and rows[s]['peak_mib'] is None
        assert all(v is None for v in rows[s]['ratios'].values())
    assert doc['skipped'] == 2 and doc['failed'] == 0
    assert rows['mesa']['ratios']['peak'] == pytest.approx(1200 / 2000)
    md = open(osp.join(out, 'leaderboard.md')).read()
    assert '## Skipped cells' in md and '| `amp` (skipped) |' in md

    # bf16 about as fast as fp32: measured; --cpu-amp run/skip override the probe
    monkeypatch.setattr(cli, 'cpu_bf16_slowdown', lambda: 1.5)
    assert cli.amp_skip_reason(cli.parse_args(['--strategies', 'amp'])) is None
    assert cli.amp_skip_reason(cli.parse_args(['--strategies', 'amp', '--cpu-amp', 'skip'])) \
        == 'AMP on CPU skipped (--cpu-amp skip)'
    monkeypatch.setattr(cli, 'cpu_bf16_slowdown', lambda: 50.0)
    assert cli.amp_skip_reason(cli.parse_args(['--strategies', 'amp', '--cpu-amp', 'run'])) \
        is None
    assert cli.amp_skip_reason(cli.parse_args(['--strategies', 'amp', '--device', 'cuda'])) \
        is None

    # readable x86 flags decide without a timing probe
    monkeypatch.setattr(cli, 'cpu_bf16_slowdown', lambda: 1.0)
    monkeypatch.setattr(cli, 'cpu_native_bf16', lambda: False)
    assert cli.amp_skip_reason(cli.parse_args(['--strategies', 'amp'])).startswith(
        'this CPU has no native bf16 arithmetic (none of avx512_bf16, amx_bf16')
    monkeypatch.setattr(cli, 'cpu_bf16_slowdown', lambda: 50.0)
    monkeypatch.setattr(cli, 'cpu_native_bf16', lambda: True)
    assert cli.amp_skip_reason(cli.parse_args(['--strategies', 'amp'])) is None


def test_cpu_native_bf16_reads_the_flags(tmp_path):
    info = tmp_path / 'cpuinfo'
    info.write_text('processor\t: 0\nflags\t\t: fpu avx2 avx512f\n')
    assert cli.cpu_native_bf16(str(info)) is False
    info.write_text('processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16\n')
    assert cli.cpu_native_bf16(str(info)) is True
    info.write_text('processor\t: 0\nFeatures\t: fp asimd\n')  # arm64: no x86 flags
    assert cli.cpu_native_bf16(str(info)) is None
    assert cli.cpu_native_bf16(str(tmp_path / 'absent')) is None


def test_cuda_sweep_budget_is_reserved_memory(tmp_path):
    """On CUDA a batch 'fits' when its max_memory_reserved stays within the fp32
    cell's; the allocated peak would allow more."""
    run = FakeRunner(peaks={
        # (allocated MiB, reserved MiB) at batch b
        'fp32': (lambda b: 100 + 50 * b, lambda b: 200 + 100 * b),  # budget: 400 reserved
        'mesa': (lambda b: 100 + 10 * b, lambda b: 200 + 40 * b),  # reserved <= 400: b <= 5
    })
    out = str(tmp_path / 'out')
    code = cli.main(['--models', TINY, '--strategies', 'mesa', '--device', 'cuda',
                     '--sweep', 'batch', '--out', out], run=run)
    assert code == 0
    rows = {r['strategy']: r for r in json.load(open(osp.join(out, 'leaderboard.json')))['rows']}
    assert (rows['fp32']['max_batch'], rows['fp32']['max_batch_exact']) == (2, True)
    # by allocated memory (fp32: 200 MiB at batch 2) mesa would get 10
    assert (rows['mesa']['max_batch'], rows['mesa']['max_batch_exact']) == (5, True)
    assert rows['mesa']['ratios']['max_batch'] == pytest.approx(5 / 2)
    assert rows['mesa']['peak_reserved_mib'] == 280
    probes = [s for s in run.specs if s.peak_only]
    assert probes and all(s.warmup_batch is None for s in probes)  # CUDA: warm up as probed


# -------------------------------------------------------------- end to end
def _bench(args, tmp_path, timeout=1500):
    out = str(tmp_path / 'bench')
    env = dict(os.environ, MESA_BACKEND='eager')
    run = subprocess.run([sys.executable, osp.join(REPO, 'tools', 'benchmark.py'), *args,
                          '--size', '64', '64', '--steps', '1', '--threads', '1',
                          '--out', out], capture_output=True, text=True, env=env,
                         timeout=timeout, cwd=REPO)
    doc = None
    if osp.isfile(osp.join(out, 'leaderboard.json')):
        with open(osp.join(out, 'leaderboard.json')) as f:
            doc = json.load(f)
    return run, out, doc


@pytest.mark.slow
def test_benchmark_end_to_end(tmp_path):
    run, out, doc = _bench(['--models', TINY, '--strategies', 'fp32', 'cp', 'mesa'], tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = {r['strategy']: r for r in doc['rows']}
    assert list(rows) == ['fp32', 'cp', 'mesa']
    for r in doc['rows']:
        assert set(r) == ROW_KEYS
        assert r['error'] is None
        assert r['peak_mib'] > 0 and r['activation_mib'] > 0 and r['step_s'] > 0
        assert osp.isfile(r['log'])
    assert rows['fp32']['reference'] is True
    assert rows['fp32']['loss'] == rows['cp']['loss'] == "mmseg's CE (upsample, then CE)"
    assert rows['mesa']['loss'] == 'fused resize + CE, logits kept in 8 bits (Mesa)'
    assert (rows['cp']['checkpointing'], rows['mesa']['checkpointing']) == (True, False)
    # measured, not assumed: checkpointing and Mesa keep the forward exact
    for s in ('cp', 'mesa'):
        assert rows[s]['reference'] is False and rows[s]['same_initial_weights'] is True
    assert rows['cp']['forward_exact'] is True and rows['cp']['grad_cosine'] > 0.9999
    assert rows['mesa']['forward_exact'] is True and rows['mesa']['grad_cosine'] > 0.99
    assert rows['mesa']['mesa_layers'] > 0 == rows['cp']['mesa_layers']
    assert rows['mesa']['activation_mib'] < 0.5 * rows['fp32']['activation_mib']
    assert rows['mesa']['ratios']['activation'] == pytest.approx(
        rows['mesa']['activation_mib'] / rows['fp32']['activation_mib'])
    assert doc['machine']['torch'] == torch.__version__ and doc['machine']['cpu_count']
    assert doc['settings']['size'] == [64, 64] and doc['settings']['steps'] == 1
    assert 'tools/benchmark.py' in doc['command']
    assert os.path.getsize(osp.join(out, 'pareto_tiny_upernet_swin.png')) > 10_000
    md = open(osp.join(out, 'leaderboard.md')).read()
    assert doc['command'] in md and "Mesa's own saving" in md
    assert '| `mesa` | fused resize + CE, logits kept in 8 bits (Mesa) |' in run.stdout  # the table is printed


TINY_RESNET = """_base_ = [{tiny!r}]
model = dict(
    _delete_=True, type='EncoderDecoder',
    data_preprocessor=dict(type='SegDataPreProcessor', mean=[123.675, 116.28, 103.53],
                           std=[58.395, 57.12, 57.375], bgr_to_rgb=True, pad_val=0,
                           seg_pad_val=255, size=(64, 64)),
    backbone=dict(type='ResNetV1c', depth=18, out_indices=(3, ), norm_cfg=dict(type='BN')),
    decode_head=dict(type='FCNHead', in_channels=512, channels=16, num_convs=1,
                     num_classes=19, norm_cfg=dict(type='BN'),
                     loss_decode=dict(type='CrossEntropyLoss', loss_weight=1.0)),
    train_cfg=dict(), test_cfg=dict(mode='whole'))
"""


@pytest.mark.slow
def test_benchmark_reports_a_cell_that_cannot_run(tmp_path):
    """Mesa has no twin for ResNet: that cell fails in its own process, is
    reported in its row, and the fp32 cell still completes (exit code 1)."""
    config = tmp_path / 'tiny_resnet.py'
    config.write_text(TINY_RESNET.format(tiny=TINY))
    run, out, doc = _bench(['--models', str(config), '--strategies', 'fp32', 'mesa'], tmp_path)
    assert run.returncode == 1, run.stderr[-3000:]
    fp32, mesa = doc['rows']
    assert fp32['error'] is None and fp32['peak_mib'] > 0
    assert mesa['error'].startswith('mesa_seg.errors.UsageError: ')
    assert "strategy 'mesa' needs a backbone with a Mesa twin" in mesa['error']
    assert 'this config has ResNetV1c' in mesa['error']
    assert mesa['peak_mib'] is None and osp.isfile(mesa['log'])
    assert 'FAILED tiny_resnet / mesa: mesa_seg.errors.UsageError' in run.stdout
