"""tools/compare_training.py (mesa_seg.compare): FP32 and Mesa trained with
the same settings, losses and mIoU read back, report written."""
import json
import os.path as osp

import numpy as np
import pytest
import torch
from PIL import Image

import mesa_seg  # noqa: F401
import mesa_seg.mesa as mesa
from mesa_seg import compare
from mesa_seg.apis import run_train

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
TINY = osp.join(REPO, 'tests', 'data', 'tiny_upernet_swin.py')
DEMO = osp.join(REPO, 'configs', 'demo', 'upernet_swin_demo.py')


def test_moving_average_and_summary():
    avg = compare._moving_average([1.0, 3.0, 5.0, 7.0], window=2)
    assert np.allclose(avg, [1.0, 2.0, 4.0, 6.0])
    run = dict(losses=dict(loss=list(np.linspace(2.0, 1.0, 30))),
               val=[dict(step=30, mIoU=41.5, aAcc=80.0, mAcc=50.0)])
    s = compare.summarize(run, window=10)
    assert s['iters'] == 30 and s['mIoU'] == 41.5 and s['finite']
    assert s['final_loss'] == pytest.approx(np.mean(run['losses']['loss'][-3:]))
    assert s['first_loss'] > s['final_loss']


def test_schedule_and_crop_follow_the_requested_run():
    from mmengine.config import Config
    cfg = Config.fromfile(DEMO)  # warm-up, then poly decay to max_iters
    total, warmup = cfg.train_cfg.max_iters, cfg.param_scheduler[0].end
    half = compare._schedule_options(DEMO, total // 2)
    assert half == [
        'param_scheduler.0.begin=0', f'param_scheduler.0.end={warmup // 2}',
        f'param_scheduler.1.begin={warmup // 2}',
        f'param_scheduler.1.end={total // 2}'
    ]
    assert compare._schedule_options(DEMO, total) == []
    assert compare._crop_options(DEMO, (64, 96)) == [
        'train_dataloader.dataset.pipeline.3.crop_size=(64,96)',
        'model.data_preprocessor.size=(64,96)'
    ]


@pytest.mark.slow
def test_compare_writes_the_report(tmp_path, demo_root):
    mesa_cfg = tmp_path / 'tiny_mesa.py'
    mesa_cfg.write_text(
        f'_base_ = [{TINY!r}]\n'
        "model = dict(type='MesaEncoderDecoder', mesa=dict(groups='channels'),"
        " backbone=dict(type='MesaSwinTransformer'))\n")
    threads, backend = torch.get_num_threads(), mesa.get_backend()
    torch.set_num_threads(1)
    mesa.set_backend('eager')
    try:
        report = compare.compare(
            dict(fp32=TINY, mesa=str(mesa_cfg)), demo_root, str(tmp_path),
            iters=3, seed=1, train=run_train,
            options=['model.decode_head.dropout_ratio=0',
                     'model.auxiliary_head.dropout_ratio=0'])
    finally:
        torch.set_num_threads(threads)
        mesa.set_backend(backend)
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
    assert Image.open(tmp_path / 'report.png').size[0] > 500
