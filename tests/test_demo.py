"""tools/demo.py (``make demo``): a short console (progress bars + results)
while the work dir keeps the full logs."""
import glob
import importlib.util
import os
import os.path as osp
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch

from mesa_seg.datasets import DEMO_CLASSES

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))


@pytest.fixture(scope='module')
def demo():
    spec = importlib.util.spec_from_file_location(
        'demo_tool', osp.join(REPO, 'tools', 'demo.py'))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


def test_output_to_captures_python_c_level_and_child_output(
        demo, tmp_path, capfd):
    log = tmp_path / 'console.log'
    with demo._output_to(str(log)):
        print('from python')
        print('to stderr', file=sys.stderr)
        os.system('echo from a child process')
    print('after the block')
    assert set(log.read_text().split('\n')) == {
        'from python', 'to stderr', 'from a child process', ''
    }
    assert capfd.readouterr().out == 'after the block\n'


def test_class_iou_lists_the_classes_in_the_labels(demo):
    # per image: (intersect, union, predicted area, label area) per class
    t = torch.tensor
    results = [(t([2., 0, 0]), t([4., 3, 0]), t([3., 3, 0]), t([3., 0, 0])),
               (t([1., 0, 0]), t([2., 0, 1]), t([1., 0, 0]), t([2., 0, 1]))]
    present, absent = demo._class_iou(results, ('sky', 'tree', 'road'))
    assert present == {'sky': 50.0, 'road': 0.0}
    assert absent == 1  # tree: predicted, never in the labels


FAKE_BENCHMARK = """
import sys
print('args:', ' '.join(sys.argv[1:]))
sys.exit(int(sys.argv[-1].endswith('fail/benchmark')))
"""


def test_memory_step_runs_the_benchmark_on_fp32_fused_loss_cp_and_mesa(
        demo, tmp_path, monkeypatch, capfd):
    script = tmp_path / 'benchmark.py'
    script.write_text(FAKE_BENCHMARK)
    monkeypatch.setattr(demo, 'BENCHMARK', str(script))
    demo._benchmark(str(tmp_path / 'ok'))
    out = capfd.readouterr().out
    assert '--models upernet_swin --strategies fp32 fused_loss cp mesa --size 256 256 ' \
        f'--batch 2 --steps 1 --out {tmp_path}/ok/benchmark' in out
    assert 'failed' not in out
    demo._benchmark(str(tmp_path / 'fail'))
    assert 'memory benchmark failed (exit code 1' in capfd.readouterr().out


def test_memory_step_says_when_the_benchmark_is_missing(
        demo, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(demo, 'BENCHMARK', str(tmp_path / 'none.py'))
    demo._benchmark(str(tmp_path))
    assert 'memory table skipped' in capsys.readouterr().out


@pytest.mark.slow
def test_demo_console_is_short_and_the_work_dir_has_the_full_log(
        tmp_path, demo_root):
    work_dir = tmp_path / 'wd'
    done = subprocess.run(
        [sys.executable, 'tools/demo.py', '--data-root', demo_root,
         '--work-dir', str(work_dir), '--no-memory-report', '--cfg-options',
         'train_cfg.max_iters=2'],
        cwd=REPO,
        env=dict(os.environ, MESA_BACKEND='eager'),
        capture_output=True,
        text=True,
        timeout=900)
    console = done.stdout + done.stderr
    assert done.returncode == 0, console[-3000:]
    # tqdm redraws a bar with '\r'; a finished bar is one line
    assert len(console.split('\n')) < 60, console
    assert 'validation mIoU' in done.stdout
    assert 'predicting the most frequent class everywhere' in done.stdout
    assert 'training: 100%' in done.stderr and 'loss=' in done.stderr
    assert 'validation: 100%' in done.stderr
    # the classes in the validation labels, and only those
    labels = set()
    for name in os.listdir(osp.join(demo_root, 'annotations', 'validation')):
        labels |= set(np.unique(cv2.imread(
            osp.join(demo_root, 'annotations', 'validation', name),
            cv2.IMREAD_UNCHANGED)).tolist())
    iou_line = [
        line for line in done.stdout.split('\n')
        if line.startswith('IoU (%) of the classes')
    ][0]
    for name, ade_id in DEMO_CLASSES.items():
        assert (f' {name} ' in iou_line) == (ade_id in labels), iou_line
    assert 'wall' not in iou_line
    for noise in ('paramwise_options', 'Config:', 'per class results',
                  '+-----', '| nan'):
        assert noise not in console, noise

    run_dir = work_dir / 'upernet_swin_mesa_demo'
    log = open(glob.glob(str(run_dir / '2*' / '*.log'))[0]).read()
    assert 'full log (config, hooks, all log lines' in done.stdout
    for full in ('Config:', "type='MesaEncoderDecoder'", 'paramwise_options',
                 'per class results', 'Iter(val) [2/2]'):
        assert full in log, full
    assert 'paramwise_options' in (run_dir / 'console.log').read_text()
