"""tools/memory_report.py and mesa_seg.memory: meters, breakdown, sweep, end to end."""
import json
import os
import os.path as osp
import subprocess
import sys

import pytest
import torch
from torch import nn

import mesa_seg  # noqa: F401  (compat + registration before mmseg is used)
from mesa_seg.memory import (CPUAllocatorTrace, PartMapper, RunSpec, activation_breakdown,
                             largest_batch, method_scopes)
from mesa_seg.memory.measure import build_training, load_cfg, measure, synthetic_batch

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
MiB = 1024 ** 2

# UperNet + Swin at toy width/depth, the repo's configs otherwise.
TINY = """_base_ = [{base!r}]
model = dict(
    backbone=dict(embed_dims=32, depths=[1, 1, 1, 1], num_heads=[1, 2, 4, 8]),
    decode_head=dict(in_channels=[32, 64, 128, 256], channels=32, num_classes={classes}),
    auxiliary_head=dict(in_channels=128, channels=16, num_classes={classes}))
"""


def _write_tiny(folder, name, base, classes=20):
    path = osp.join(str(folder), f'{name}.py')
    with open(path, 'w') as f:
        f.write(TINY.format(base=osp.join(ROOT, 'configs', base), classes=classes))
    return path


@pytest.fixture(scope='module')
def tiny_configs(tmp_path_factory):
    folder = tmp_path_factory.mktemp('configs')
    return (_write_tiny(folder, 'tiny_swin', 'upernet_swin.py'),
            _write_tiny(folder, 'tiny_swin_mesa', 'upernet_swin_mesa.py'))


@pytest.fixture
def eager_mesa(monkeypatch):
    """Mesa's eager kernels (no torch.compile time), here and in subprocesses."""
    from mesa_seg.mesa import use_backend
    monkeypatch.setenv('MESA_BACKEND', 'eager')
    with use_backend('eager'):
        yield


# ------------------------------------------------------------------ meters
def test_allocator_trace_counts_exact_bytes():
    with CPUAllocatorTrace() as trace:
        kept = torch.ones(MiB // 4)  # 1 MiB, live through the window
        with trace.window('w'):
            tmp = torch.ones(3 * MiB // 4)  # +3 MiB
            kept2 = tmp[:10].clone()  # +40 bytes, survives the window
            del tmp  # -3 MiB
    start, peak = trace.levels('w')
    assert start == MiB
    assert peak == MiB + 3 * MiB + 40
    assert trace.end_level == MiB + 40
    assert 'aten::clone' in trace.peak_ops('w')  # the allocation that made the peak
    del kept, kept2


# --------------------------------------------------------------- breakdown
def _named(**children):
    m = nn.Module()
    for name, child in children.items():
        m.add_module(name, child)
    return m


def test_part_mapper_swin_and_pvt_naming():
    swin = _named(backbone=_named(patch_embed=nn.Identity(), stages=nn.ModuleList(),
                                  norm0=nn.Identity(), norm3=nn.Identity()))
    parts = PartMapper(swin)
    assert parts('backbone.patch_embed.projection') == 'backbone.stem'
    assert parts('backbone.stages.0.blocks.1.attn.w_msa') == 'backbone.stage1'
    assert parts('backbone.stages.3.downsample') == 'backbone.stage4'
    assert parts('backbone.norm0') == 'backbone.stage1'
    pvt = _named(backbone=_named(patch_embed1=nn.Identity(), block1=nn.Identity(),
                                 norm4=nn.Identity()))
    parts = PartMapper(pvt)
    assert parts('backbone.patch_embed1.proj') == 'backbone.stage1'
    assert parts('backbone.block1.0.attn.q') == 'backbone.stage1'
    assert parts('backbone.norm4') == 'backbone.stage4'
    assert parts('neck.lateral_convs.0.conv') == 'neck'
    assert parts('decode_head.fpn_bottleneck.conv') == 'decode_head'
    assert parts('auxiliary_head.0.convs.0') == 'auxiliary_head'
    assert parts('decode_head.loss_decode') == 'loss'
    assert parts('auxiliary_head.loss_by_feat') == 'loss'
    assert parts('', 'EncoderDecoder') == 'other'


def _tiny_segmentor(config, size=(64, 64), batch=2):
    cfg, size = load_cfg(RunSpec(config=config, size=size))
    model, optim_wrapper = build_training(cfg, 'cpu')
    data = synthetic_batch(model, batch, size)

    def forward_loss():
        losses = model._run_forward(model.data_preprocessor(data, True), mode='loss')
        return model.parse_losses(losses)[0]

    return model, optim_wrapper, data, forward_loss


def test_loss_tensors_attributed_to_loss(tiny_configs):
    """What a head's loss_by_feat saves (outside any module's forward) is 'loss'."""
    from mesa_seg.mesa.audit import audit_saved_tensors
    model, _, _, forward_loss = _tiny_segmentor(tiny_configs[0])
    keys = set(model.state_dict())
    found = activation_breakdown(model, forward_loss)
    parts = found['by_part']
    assert list(parts)[:5] == ['backbone.stem'] + [f'backbone.stage{i}' for i in (1, 2, 3, 4)]
    assert 'other' not in parts
    # two heads x (log-probabilities (2, 20, 64, 64) fp32 + top-k indices (2, 1, 64, 64))
    assert parts['loss']['uncompressed'] >= 2 * (2 * 20 * 64 * 64 * 4 + 2 * 64 * 64 * 8)
    assert found['total'] == sum(c['compressed'] + c['uncompressed'] for c in parts.values())
    assert found['total'] == sum(c['compressed'] + c['uncompressed']
                                 for c in found['by_op'].values())
    # the same forward without the scopes leaves the accuracy's indices on the root
    roots = [r for r in audit_saved_tensors(model, forward_fn=forward_loss) if not r.module]
    assert roots and all(r.op == 'topk' for r in roots)
    # and the scopes leave nothing behind
    assert set(model.state_dict()) == keys
    assert 'forward' not in vars(model.decode_head)
    assert 'loss_by_feat' not in model.decode_head._modules


def test_method_scopes_restore_on_error(tiny_configs):
    model, _, _, _ = _tiny_segmentor(tiny_configs[0])
    with pytest.raises(RuntimeError, match='boom'):
        with method_scopes(model):
            assert isinstance(model.decode_head.loss_by_feat, nn.Module)
            raise RuntimeError('boom')
    assert 'loss_by_feat' not in vars(model.decode_head)
    assert not any('loss_by_feat' in n for n, _ in model.named_modules())


# ------------------------------------------------------------------- sweep
def test_largest_batch_finds_boundary_with_few_probes():
    fixed, per_image = 1000.0, 130.0
    calls = []

    def probe(b):
        calls.append(b)
        return int(fixed + per_image * b + (7 if b % 2 else 0))  # not quite affine

    budget = fixed + per_image * 23 + 50  # 23 fits, 24 does not
    found = largest_batch(probe, budget, known={2: probe(2)}, fixed=fixed)
    assert (found.max_batch, found.exact) == (23, True)
    assert len(found.probes) <= 3


def test_largest_batch_oom_cap_and_probe_limit():
    # None = out of memory; beyond 10 everything fails
    found = largest_batch(lambda b: 10 * b if b <= 10 else None, budget=10_000,
                          known={1: 10}, max_batch=64)
    assert (found.max_batch, found.exact) == (10, True)
    found = largest_batch(lambda b: b, budget=1e9, known={1: 1}, max_batch=32)
    assert (found.max_batch, found.exact) == (32, True)
    found = largest_batch(lambda b: b * b, budget=10_000, known={1: 1}, max_probes=1)
    assert found.max_batch <= 100 and len(found.probes) == 1
    assert not found.exact or found.max_batch == 100


# --------------------------------------------------------------- measuring
def test_probe_peak_independent_of_warmup_batch(tiny_configs, eager_mesa):
    """The CPU sweep warms up at --batch and probes another batch: same peak
    as warming up at the probed batch (the CPU allocator keeps no cache)."""
    common = dict(config=tiny_configs[1], size=(64, 64), batch=3, peak_only=True,
                  threads=1)
    direct = measure(RunSpec(**common))
    via_other = measure(RunSpec(**common, warmup_batch=2))
    assert abs(via_other['peak'] - direct['peak']) <= 0.01 * direct['peak']


@pytest.mark.parametrize('argv,message', [
    (['nope.py', '--baseline', 'nope.py'], 'config file not found: nope.py'),
    (['{cfg}', '--baseline', '{cfg}', '--budget-mb', '9'], '--budget-mb needs --sweep batch'),
    (['{cfg}', '--baseline', '{cfg}', '--warmup', '0'], '--warmup must be >= 1'),
    (['{cfg}', '--baseline', '{cfg}', '--strategy', 'int8'], "invalid choice: 'int8'"),
    (['{cfg}', '--baseline', '{cfg}', '--baseline-strategy', 'x'], "invalid choice: 'x'"),
])
def test_cli_rejects_bad_input(argv, message, capsys):
    from mesa_seg.memory.cli import parse_args
    cfg = osp.join(ROOT, 'configs', 'upernet_swin.py')
    with pytest.raises(SystemExit) as exit_:
        parse_args([a.format(cfg=cfg) for a in argv])
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_cli_strategies_on_one_config():
    """--strategy / --baseline-strategy: the same config measured twice, e.g.
    Mesa against an FP32 model with the same (fused) loss."""
    from mesa_seg.memory.cli import _entries, _entry_names, parse_args
    cfg = osp.join(ROOT, 'configs', 'upernet_swin.py')
    mesa_cfg = osp.join(ROOT, 'configs', 'upernet_swin_mesa.py')
    args = parse_args([cfg, '--baseline', cfg, '--strategy', 'mesa',
                       '--baseline-strategy', 'fused_loss'])
    entries = _entries(args)
    assert entries == [(cfg, 'fused_loss'), (cfg, 'mesa')]
    assert _entry_names(entries) == ['upernet_swin [fused_loss]', 'upernet_swin [mesa]']
    # without strategies: as before, a config equal to the baseline is measured once
    args = parse_args([cfg, mesa_cfg, '--baseline', cfg])
    assert _entries(args) == [(cfg, None), (mesa_cfg, None)]
    assert _entry_names(_entries(args)) == ['upernet_swin', 'upernet_swin_mesa']
    args = parse_args([cfg, '--baseline', cfg, '--strategy', 'cp'])
    assert _entries(args) == [(cfg, None), (cfg, 'cp')]


def test_main_table_says_which_loss_each_side_used():
    from mesa_seg.memory.report import add_ratios, main_table

    def result(name, loss, cp, precision, peak):
        return dict(name=name, device='cpu', oom=False, peak=peak * MiB,
                    activation=dict(total=peak * MiB / 2), step_time=dict(median=1.0),
                    step_cpu_time=dict(median=2.0), peak_rss=peak * MiB,
                    model=dict(loss=loss, checkpointing=cp, precision=precision))

    base = result('a [fused_loss]', 'fused resize + CE', False, 'fp32', 1000)
    other = result('a [mesa_cp]', 'fused resize + CE', True, 'fp32', 500)
    amp = result('a [amp]', "mmseg's CE (upsample, then CE)", False, 'bfloat16 AMP (CPU)', 800)
    add_ratios([base, other, amp], base)
    table = main_table([base, other, amp], base, None)
    assert table[0].startswith('| config | loss | checkpointing | precision | peak training')
    assert table[2].startswith('| a [fused_loss] (baseline) | fused resize + CE | none | fp32 '
                               '| 1,000 (1.00×) |')
    assert table[3].startswith('| a [mesa_cp] | fused resize + CE | every backbone block | '
                               'fp32 | 500 (0.50×) |')
    assert table[4].startswith("| a [amp] | mmseg's CE (upsample, then CE) | none | "
                               'bfloat16 AMP (CPU) | 800 (0.80×) |')


# -------------------------------------------------------------- end to end
@pytest.fixture(scope='module')
def report(tmp_path_factory):
    """One run of the tool: tiny UperNet-Swin FP32 vs Mesa, ADE20K's 150 classes,
    192 px (big enough that tensors, not Python objects, dominate the RSS),
    batch sweep."""
    folder = tmp_path_factory.mktemp('configs150')
    base = _write_tiny(folder, 'tiny_swin', 'upernet_swin.py', classes=150)
    mesa = _write_tiny(folder, 'tiny_swin_mesa', 'upernet_swin_mesa.py', classes=150)
    out = str(tmp_path_factory.mktemp('report'))
    env = dict(os.environ, MESA_BACKEND='eager')
    cmd = [sys.executable, osp.join(ROOT, 'tools', 'memory_report.py'), mesa,
           '--baseline', base, '--size', '192', '192', '--batch', '2', '--steps', '1',
           '--threads', '1', '--sweep', 'batch', '--max-probes', '3', '--out', out]
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1200)
    assert run.returncode == 0, run.stderr[-3000:]
    with open(osp.join(out, 'report.json')) as f:
        return out, json.load(f), run.stdout


@pytest.mark.slow
def test_report_files_and_figures(report):
    out, rep, stdout = report
    for name in ('report.md', 'report.json', 'report.png'):
        assert os.path.getsize(osp.join(out, name)) > 0
    base, mesa = rep['results']
    assert rep['baseline'] == base['name'] == 'tiny_swin' and mesa['name'] == 'tiny_swin_mesa'
    assert rep['environment']['torch'] == torch.__version__
    assert rep['settings']['device'] == 'cpu' and base['size'] == [192, 192]
    for r in (base, mesa):
        assert r['step_start'] < r['peak']
        # what is resident at a step's start: weights, optimizer state (AdamW: 2x),
        # buffers and the batch
        assert r['params'] * 3 + r['buffers'] <= r['step_start'] <= \
            r['params'] * 3 + r['buffers'] + 2 * MiB
        assert abs(r['step_drift']) <= 0.01 * (r['peak'] - r['step_start'])
        assert r['step_time']['median'] > 0
    assert base['model']['mesa_layers'] == 0 < mesa['model']['mesa_layers']
    # honest labels, read from the built models
    assert base['model']['loss'] == "mmseg's CE (upsample, then CE)"
    assert mesa['model']['loss'] == 'fused resize + CE, logits kept in 8 bits (Mesa)'
    for r in (base, mesa):
        assert r['model']['checkpointing'] is False and r['model']['precision'] == 'fp32'
    assert rep['environment']['cpu_count'] == os.cpu_count()
    # Two independent measurements agree: what Mesa saves in activation memory
    # (autograd's saved tensors) shows in the peak (allocator events), and the
    # peak saves at most that plus the loss's transients: mmseg's loss backward
    # holds batch-wide full-resolution score maps (two of 2 x 150 x 192 x 192
    # floats), the streamed fused loss one block of classes.
    peak_saved = base['peak'] - mesa['peak']
    act_saved = base['activation']['total'] - mesa['activation']['total']
    score_maps = 2 * 150 * 192 * 192 * 4
    assert act_saved <= 1.05 * peak_saved, (peak_saved, act_saved)
    assert peak_saved <= act_saved + 2 * score_maps, (peak_saved, act_saved)
    # Mesa keeps 8-bit codes: activation memory well under half, peak lower
    assert mesa['ratios']['activation'] < 0.4 and mesa['ratios']['peak'] < 0.8
    assert mesa['activation']['by_part']['backbone.stage1']['compressed'] > 0
    md = open(osp.join(out, 'report.md')).read()
    assert rep['command'] in md and 'tiny_swin_mesa' in md and '| loss |' in md
    assert 'tiny_swin (baseline)' in stdout
    assert "| tiny_swin (baseline) | mmseg's CE (upsample, then CE) | none | fp32 |" in stdout
    assert '| tiny_swin_mesa | fused resize + CE, logits kept in 8 bits (Mesa) | none | fp32 |' in md


@pytest.mark.slow
def test_cpu_figures_agree_with_rss(report):
    """The allocator's figure (peak minus start of a step) agrees with the
    independent RSS measurement of the same run's steps within 15%."""
    _, rep, _ = report
    for r in rep['results']:
        alloc = r['peak'] - r['step_start']
        assert abs(r['rss_step_growth'] - alloc) <= 0.15 * alloc, (r['name'], alloc,
                                                                   r['rss_step_growth'])


@pytest.mark.slow
def test_batch_sweep(report):
    _, rep, _ = report
    base, mesa = rep['results']
    budget = rep['settings']['budget']
    assert budget == base['peak']
    for r in (base, mesa):
        sweep = r['sweep']
        peaks = {int(b): p for b, p in sweep['peaks'].items()}
        fits = [b for b, p in peaks.items() if p is not None and p <= budget]
        assert sweep['max_batch'] == max(fits)
        if sweep['exact']:
            assert peaks[sweep['max_batch'] + 1] > budget
    # Each probe ran in a fresh process. Where the peak is stays put for FP32
    # (the end of the forward): its probes lie on one line, a fixed part plus
    # the same bytes per image. Mesa's peak moves as the batch grows (the loss's
    # backward at 2 images, its forward at 11, the bottleneck conv's forward at
    # 24): the maximum of several such lines, so its slopes never decrease.
    for r in (base, mesa):
        pts = sorted((int(b), p) for b, p in r['sweep']['peaks'].items() if p is not None)
        assert len(pts) >= 2, r['name']
        slopes = [(p1 - p0) / (b1 - b0) for (b0, p0), (b1, p1) in zip(pts, pts[1:])]
        assert min(slopes) > 0, (r['name'], slopes)
        if r is base:
            assert max(slopes) <= 1.05 * min(slopes), (r['name'], slopes)
        assert all(b >= 0.95 * a for a, b in zip(slopes, slopes[1:])), (r['name'], slopes)
    # FP32 peaks at the end of the forward pass: its fixed part is what is
    # resident at a step's start (weights, optimizer state), measured apart
    (b0, p0), (b1, p1) = sorted((int(b), p) for b, p in base['sweep']['peaks'].items())[:2]
    fixed = p0 - b0 * (p1 - p0) / (b1 - b0)
    assert abs(fixed - base['step_start']) <= 0.05 * base['peak'], (fixed, base['step_start'])
    assert base['sweep']['exact'] and mesa['sweep']['max_batch'] >= 3
