"""tools/compare_training.py (mesa_seg.compare): FP32 and Mesa trained with
the same settings, losses and mIoU read back, report written."""
import json
import os.path as osp

import numpy as np
import pytest
import torch
from PIL import Image

import mesa_seg.mesa as mesa
from mesa_seg.cli import run_train
from mesa_seg.compare import compare, moving_average, summarize, write_report
from mesa_seg.compare.runs import crop_options, schedule_options
from mesa_seg.machine import describe_machine

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
TINY = osp.join(REPO, 'tests', 'data', 'tiny_upernet_swin.py')
DEMO = osp.join(REPO, 'configs', 'demo', 'upernet_swin_demo.py')


def test_moving_average_and_summary():
    avg = moving_average([1.0, 3.0, 5.0, 7.0], window=2)
    assert np.allclose(avg, [1.0, 2.0, 4.0, 6.0])
    run = dict(losses=dict(loss=list(np.linspace(2.0, 1.0, 30))),
               val=[dict(step=30, mIoU=41.5, aAcc=80.0, mAcc=50.0)])
    s = summarize(run, window=10)
    assert s['iters'] == 30 and s['mIoU'] == 41.5 and s['finite']
    assert s['final_loss'] == pytest.approx(np.mean(run['losses']['loss'][-3:]))
    assert s['first_loss'] > s['final_loss']


def test_schedule_and_crop_follow_the_requested_run():
    from mmengine.config import Config
    cfg = Config.fromfile(DEMO)  # warm-up, then poly decay to max_iters
    total, warmup = cfg.train_cfg.max_iters, cfg.param_scheduler[0].end
    half = schedule_options(DEMO, total // 2)
    assert half == [
        'param_scheduler.0.begin=0', f'param_scheduler.0.end={warmup // 2}',
        f'param_scheduler.1.begin={warmup // 2}',
        f'param_scheduler.1.end={total // 2}'
    ]
    assert schedule_options(DEMO, total) == []
    assert crop_options(DEMO, (64, 96)) == [
        'train_dataloader.dataset.pipeline.3.crop_size=(64,96)',
        'model.data_preprocessor.size=(64,96)'
    ]


def test_report_from_two_runs(tmp_path):
    def run(losses, miou):
        return dict(losses=dict(loss=losses), iters=len(losses),
                    val=[dict(step=len(losses), mIoU=miou, aAcc=80.0,
                              mAcc=50.0)])

    runs = dict(fp32=run([2.0, 1.5, 1.0], 40.0),
                mesa=run([2.0, 1.6, 1.2], 41.0))
    setup = dict(
        configs=dict(fp32='a.py', mesa='b.py'), data_root='data', iters=3,
        seed=0, crop=None, batch=None, val_interval=None, options=[],
        wall_s=dict(fp32=60.0, mesa=90.0), same_init=True, device='cpu',
        machine=describe_machine('cpu'), threads=None)
    report = write_report(str(tmp_path), runs, setup, window=2)
    assert report['delta']['final_loss'] == pytest.approx(0.2)
    assert report['delta']['mIoU'] == pytest.approx(1.0)
    md = (tmp_path / 'report.md').read_text()
    assert '| fp32 | 3 | 1.750 | 1.000 |' in md
    assert 'wall time fp32 1.0 min, mesa 1.5 min.' in md
    assert f'torch {torch.__version__}, mmseg ' in md
    assert 'mesa - fp32: final loss +0.200, mIoU +1.00 points.' in md
    with open(tmp_path / 'report.json') as f:
        assert json.load(f)['setup']['machine'] == setup['machine']
    assert Image.open(tmp_path / 'report.png').size[0] > 500


@pytest.mark.slow
def test_compare_writes_the_report(tmp_path, demo_root):
    mesa_cfg = tmp_path / 'tiny_mesa.py'
    mesa_cfg.write_text(
        f'_base_ = [{TINY!r}]\n'
        "model = dict(type='MesaEncoderDecoder', mesa=dict(groups='channels'),"
        " backbone=dict(type='MesaSwinTransformer'))\n")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with mesa.use_backend('eager'):
            report = compare(
                dict(fp32=TINY, mesa=str(mesa_cfg)), demo_root, str(tmp_path),
                iters=3, seed=1, train=run_train,
                options=['model.decode_head.dropout_ratio=0',
                         'model.auxiliary_head.dropout_ratio=0'])
    finally:
        torch.set_num_threads(threads)
    for name in ('fp32', 'mesa'):
        run = report['runs'][name]
        assert len(run['losses']['loss']) == 3
        assert len(run['losses']['decode.loss_ce']) == 3
        assert [v['step'] for v in run['val']] == [3]
        assert report['summary'][name]['finite']
    # same initial weights, no dropout, and the forward pass of Mesa is
    # exact: the same first loss
    assert report['runs']['fp32']['losses']['loss'][0] == pytest.approx(
        report['runs']['mesa']['losses']['loss'][0], rel=1e-5)
    with open(tmp_path / 'report.json') as f:
        assert json.load(f)['setup']['seed'] == 1
    md = (tmp_path / 'report.md').read_text()
    assert '| fp32 | 3 |' in md and '| mesa | 3 |' in md and 'mIoU' in md
    assert 'Machine: ' in md
    assert Image.open(tmp_path / 'report.png').size[0] > 500
