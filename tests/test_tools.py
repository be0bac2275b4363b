"""tools/: bad input fails cleanly; real training, resume, test, AMP and
mmseg's own train script on tiny demo data; slurm_train.sh's requeue. (The
2-process gloo launch through dist_train.sh: test_resilience_faults.py.)"""
import glob
import json
import os
import os.path as osp
import subprocess
import sys

import pytest
import torch

from mesa_seg.cli import run_test, run_train

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
TINY = osp.join(REPO, 'tests', 'data', 'tiny_upernet_swin.py')


def _error(capsys, fn, argv):
    rc = fn([str(a) for a in argv])
    err = capsys.readouterr().err.strip()
    return rc, err.splitlines()[-1] if err else ''


# ---- bad input: one clear line, exit code 2, nothing built ---------------
def test_unknown_config(capsys, tmp_path):
    rc, err = _error(capsys, run_train, ['configs/nope.py'])
    assert rc == 2 and err.endswith('config file not found: configs/nope.py')
    rc, err = _error(capsys, run_test, ['configs/nope.py', 'x.pth'])
    assert rc == 2 and 'config file not found' in err


def test_malformed_cfg_options(capsys):
    with pytest.raises(SystemExit) as exc:
        run_train([TINY, '--cfg-options', 'train_cfg.max_iters'])
    assert exc.value.code == 2
    assert 'expected KEY=VALUE' in capsys.readouterr().err


def test_cfg_options_that_do_not_fit_the_config(capsys, tmp_path):
    rc, err = _error(capsys, run_train, [
        TINY, '--work-dir', tmp_path, '--cfg-options', 'default_scope.x=1'
    ])
    assert rc == 2 and 'bad --cfg-options' in err


def test_missing_data_root(capsys, tmp_path):
    missing = tmp_path / 'no_data'
    rc, err = _error(capsys, run_train, [
        TINY, '--work-dir', tmp_path / 'wd', '--cfg-options',
        f'train_dataloader.dataset.data_root={missing}'
    ])
    assert rc == 2
    assert f'data root not found: {missing}' in err
    assert f'python tools/make_demo_data.py {missing}' in err
    (tmp_path / 'empty').mkdir()
    rc, err = _error(capsys, run_train, [
        TINY, '--work-dir', tmp_path / 'wd', '--cfg-options',
        f'train_dataloader.dataset.data_root={tmp_path / "empty"}'
    ])
    assert rc == 2 and 'has no images/training/ folder' in err


def test_images_and_annotations_must_pair_up(capsys, tmp_path):
    from mesa_seg.datasets import write_demo_dataset
    root = tmp_path / 'ade'
    write_demo_dataset(str(root), num_train=2, num_val=1, size=48)
    (root / 'annotations' / 'training' / 'ADE_train_00000002.png').unlink()
    rc, err = _error(capsys, run_train, [
        TINY, '--work-dir', tmp_path / 'wd', '--cfg-options',
        f'train_dataloader.dataset.data_root={root}',
        f'val_dataloader.dataset.data_root={root}'
    ])
    assert rc == 2 and 'do not pair up' in err
    assert "without annotation: ['ADE_train_00000002']" in err


def test_unwritable_work_dir(capsys, tmp_path, data_options):
    blocker = tmp_path / 'file'
    blocker.write_text('')
    rc, err = _error(capsys, run_train, [
        TINY, '--work-dir', blocker / 'wd', '--cfg-options', *data_options
    ])
    assert rc == 2 and 'is not writable' in err and str(blocker) in err


def test_missing_checkpoints_and_pretrained(capsys, tmp_path, data_options):
    wd = ['--work-dir', tmp_path]
    rc, err = _error(capsys, run_train,
                     [TINY, *wd, '--resume', tmp_path / 'x.pth'])
    assert rc == 2 and 'checkpoint to resume not found' in err
    rc, err = _error(capsys, run_test, [TINY, tmp_path / 'x.pth', *wd])
    assert rc == 2 and 'checkpoint not found' in err
    rc, err = _error(capsys, run_train, [
        TINY, *wd, '--cfg-options', *data_options,
        'model.pretrained=pretrained/none.pth'
    ])
    assert rc == 2 and 'pretrained weights not found' in err


def test_cli_error_has_no_traceback():
    done = subprocess.run(
        [sys.executable, osp.join(REPO, 'tools', 'train.py'), 'nope.py'],
        capture_output=True,
        text=True)
    assert done.returncode == 2
    assert done.stderr.strip() == \
        'train.py: error: config file not found: nope.py'


# ---- real runs on tiny demo data ------------------------------------------
def _scalars(work_dir):
    """Logged records of the most recent run in work_dir."""
    run = sorted(glob.glob(osp.join(work_dir, '2*', 'vis_data')))[-1]
    with open(osp.join(run, 'scalars.json')) as f:
        return [json.loads(line) for line in f]


@pytest.mark.slow
def test_train_validate_resume_and_test(tmp_path, data_options,
                                        monkeypatch):
    # resume must work without TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD & co.
    for key in list(os.environ):
        if 'WEIGHTS_ONLY' in key:
            monkeypatch.delenv(key)
    wd = tmp_path / 'wd'
    opts = ['--work-dir', wd, '--cfg-options', *data_options]
    assert run_train([str(a) for a in [TINY, *opts]]) == 0
    first = _scalars(wd)
    assert [r['iter'] for r in first if 'loss' in r] == [1, 2]
    assert any('mIoU' in r for r in first)
    assert (wd / 'iter_2.pth').is_file()

    assert run_train(
        [str(a) for a in [TINY, '--resume', *opts, 'train_cfg.max_iters=3']]
    ) == 0
    # (scalars.json would mix both runs: the in-process Visualizer is reused)
    log = open(sorted(glob.glob(str(wd / '2*' / '*.log')))[-1]).read()
    assert 'resumed epoch: 0, iter: 2' in log
    assert 'Iter(train) [3/3]' in log and 'Iter(train) [1/3]' not in log

    out = tmp_path / 'pred'
    assert run_test([
        str(a) for a in
        [TINY, wd / 'iter_3.pth', '--work-dir', tmp_path / 'test', '--out',
         out, '--cfg-options', *data_options]
    ]) == 0
    assert sorted(os.listdir(out)) == [
        'ADE_val_00000001.png', 'ADE_val_00000002.png'
    ]


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason='CPU bf16 path')
def test_amp_on_cpu_trains_in_bf16(tmp_path, data_options):
    wd = tmp_path / 'amp'
    assert run_train([
        str(a) for a in [
            TINY, '--amp', '--work-dir', wd, '--cfg-options', *data_options,
            'train_cfg.max_iters=1'
        ]
    ]) == 0
    from mmengine.config import Config
    dumped = Config.fromfile(str(wd / 'tiny_upernet_swin.py'))
    assert dumped.optim_wrapper.type == 'CPUAmpOptimWrapper'
    assert dumped.optim_wrapper.dtype == 'bfloat16'
    assert (wd / 'iter_1.pth').is_file()


@pytest.mark.slow
def test_mmseg_own_train_script_needs_only_custom_imports(
        tmp_path, data_options):
    import mmseg
    script = osp.join(osp.dirname(mmseg.__file__), '.mim', 'tools',
                      'train.py')
    if not osp.isfile(script):
        pytest.skip('this mmseg install ships no tools/train.py')
    wd = tmp_path / 'mmseg_tool'
    done = subprocess.run(
        [sys.executable, script, TINY, '--work-dir',
         str(wd), '--cfg-options', *data_options, 'train_cfg.max_iters=1'],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (wd / 'iter_1.pth').is_file()


# ---- slurm_train.sh: requeue after a preemption ------------------------------
FAKE = """#!/usr/bin/env bash
echo "$(basename "$0") $*" >> "$FAKE_LOG"
[ "$(basename "$0")" = srun ] && exit "${FAKE_RC:-0}"
exit 0
"""


@pytest.mark.parametrize('requeue, rc, requeued', [
    ('1', 75, True), ('1', 3, False), ('1', 0, False), ('0', 75, False)])
def test_slurm_train_requeues_a_preempted_job(tmp_path, requeue, rc, requeued):
    bin_dir = tmp_path / 'bin'
    bin_dir.mkdir()
    for name in ('srun', 'scontrol'):
        (bin_dir / name).write_text(FAKE)
        (bin_dir / name).chmod(0o755)
    log = tmp_path / 'calls'
    env = dict(os.environ, PATH=f'{bin_dir}{os.pathsep}{os.environ["PATH"]}',
               FAKE_LOG=str(log), FAKE_RC=str(rc), REQUEUE=requeue,
               SLURM_JOB_ID='4242', GPUS='2', GPUS_PER_NODE='2')
    done = subprocess.run(
        [osp.join(REPO, 'tools', 'slurm_train.sh'), 'part', 'job', TINY,
         '--resume'], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == rc
    calls = log.read_text().splitlines()
    assert calls[0].startswith('srun -p part --job-name=job --gres=gpu:2 '
                               '--ntasks=2 ')
    assert calls[0].endswith(f'tools/train.py {TINY} --launcher slurm --resume')
    assert calls[1:] == (['scontrol requeue 4242'] if requeued else [])
    assert ('requeueing job 4242' in done.stderr) == requeued
