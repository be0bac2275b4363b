"""End-to-end faults through tools/train.py on the tiny demo set: exact resume,
a save killed half-way, a save that fails (disk full), a NaN that stops
training, a data file that goes bad mid-run, resuming on another number of
ranks, 50 bf16 AMP iterations. (Faults across 2 ranks: test_resilience_faults.py.)"""
import gc
import glob
import os
import os.path as osp
import re
import shutil
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from mmengine.config import Config

import mesa_seg.mesa as mesa
from mesa_seg.cli import run_train
from mesa_seg.preflight import checkpoint_to_load
from backbone_utils import is_store_once_second_copy

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
TINY = osp.join(REPO, 'tests', 'data', 'tiny_upernet_swin.py')
MESA = [
    'model.type=MesaEncoderDecoder', 'model.mesa.groups=channels',
    'model.backbone.type=MesaSwinTransformer'
]
DETERMINISTIC = ['randomness.seed=0', 'randomness.deterministic=True']
NO_VAL = ['train_cfg.val_begin=1000']  # speed: these tests check training

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _one_thread_eager():
    """One thread (2-thread OpenMP is ~10x slower on a busy 2-core box),
    eager Mesa kernels, and the global flags training sets put back."""
    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    with mesa.use_backend('eager'):
        yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(deterministic)


def _train(work_dir, data_options, *options, args=()):
    argv = [TINY, '--work-dir', work_dir, *args, '--cfg-options',
            *data_options, *MESA, *options]
    return run_train([str(a) for a in argv])


def _load(path):
    return torch.load(path, map_location='cpu', weights_only=True)


def _losses(checkpoint):
    return list(checkpoint['message_hub']['log_scalars']['train/loss'].data[0])


class _Crash(Exception):
    pass


def test_resume_continues_exactly(tmp_path, data_options, monkeypatch):
    """3 iterations, crash after the checkpoint of iteration 2, --resume:
    the same losses, weights, running ranges, optimizer and scheduler state
    as 3 uninterrupted iterations."""
    from mmengine.runner import IterBasedTrainLoop
    opts = [*DETERMINISTIC, 'train_cfg.max_iters=3', *NO_VAL]
    whole, split = tmp_path / 'whole', tmp_path / 'split'
    assert _train(whole, data_options, *opts) == 0

    run_iter = IterBasedTrainLoop.run_iter
    def crash_after_iteration_2(loop, data_batch):
        run_iter(loop, data_batch)  # trains, then saves iter_N.pth
        if loop.iter == 2:
            raise _Crash

    monkeypatch.setattr(IterBasedTrainLoop, 'run_iter',
                        crash_after_iteration_2)
    with pytest.raises(_Crash):
        _train(split, data_options, *opts)
    monkeypatch.setattr(IterBasedTrainLoop, 'run_iter', run_iter)
    mid = _load(split / 'iter_2.pth')
    assert not (split / 'iter_3.pth').exists()
    assert _train(split, data_options, *opts, args=['--resume']) == 0
    ref, got = _load(whole / 'iter_3.pth'), _load(split / 'iter_3.pth')

    assert _losses(got) == _losses(ref)  # exactly, not approximately
    assert _losses(mid) == _losses(ref)[:2]
    assert got['meta']['iter'] == 3
    for key, value in ref['state_dict'].items():
        assert torch.equal(got['state_dict'][key], value), key
    quantizer_keys = [k for k in ref['state_dict'] if '.quantizer' in k]
    assert len(quantizer_keys) > 100
    for ref_state, got_state in zip(ref['optimizer']['state'].values(),
                                    got['optimizer']['state'].values()):
        for name in ('step', 'exp_avg', 'exp_avg_sq'):
            assert torch.equal(got_state[name], ref_state[name])
    assert got['param_schedulers'] == ref['param_schedulers']
    assert got['random_state']['torch'].equal(ref['random_state']['torch'])


# ---- a save killed half-way -----------------------------------------------------
KILL_DURING_SAVE = textwrap.dedent('''
    import os, signal, sys
    import torch
    torch.set_num_threads(1)
    import mesa_seg.mesa as mesa
    from mesa_seg.cli import run_train
    mesa.set_backend('eager')
    fsync = os.fsync

    def killed_while_saving(fd):
        # the checkpoint bytes are written, not yet in place: a kill (power
        # loss, OOM killer, scheduler) lands here
        if 'iter_2.pth' in os.readlink(f'/proc/self/fd/{fd}'):
            os.kill(os.getpid(), signal.SIGKILL)
        fsync(fd)

    os.fsync = killed_while_saving
    sys.exit(run_train(sys.argv[1:]))
''')


def test_killed_save_leaves_no_truncated_checkpoint(tmp_path, data_options):
    work_dir = tmp_path / 'wd'
    assert _train(work_dir, data_options, 'train_cfg.max_iters=2',
                  *NO_VAL) == 0
    good = (work_dir / 'iter_2.pth').read_bytes()
    # run again from iter_1 and kill the process while it re-writes iter_2
    script = tmp_path / 'killed.py'
    script.write_text(KILL_DURING_SAVE)
    argv = [TINY, '--work-dir', work_dir, '--resume', work_dir / 'iter_1.pth',
            '--cfg-options', *data_options, *MESA, 'train_cfg.max_iters=2',
            *NO_VAL]
    done = subprocess.run([sys.executable, script, *map(str, argv)],
                          capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, OMP_NUM_THREADS='1'))
    assert done.returncode == -9, done.stderr[-2000:]
    # the complete old file is still there; the half-saved one has a name no
    # loader looks for
    assert (work_dir / 'iter_2.pth').read_bytes() == good
    assert glob.glob(str(work_dir / '.iter_2.pth.*.tmp'))
    # what --resume picks up next is that intact checkpoint
    cfg = Config(dict(resume=True, load_from=None, work_dir=str(work_dir)))
    assert checkpoint_to_load(cfg) == str(work_dir / 'iter_2.pth')
    assert _load(work_dir / 'iter_2.pth')['meta']['iter'] == 2


# ---- NaN: stop before the step, one line, resume later ----------------------------
def test_nan_stops_training_with_a_clear_message(tmp_path, data_options,
                                                 monkeypatch, capsys):
    from mmseg.models import SegDataPreProcessor
    forward, calls = SegDataPreProcessor.forward, []

    def nan_at_second_batch(self, data, training=False):
        out = forward(self, data, training)
        calls.append(training)
        if training and calls.count(True) == 2:
            out['inputs'][0, 0, 5, 5] = float('nan')
        return out

    monkeypatch.setattr(SegDataPreProcessor, 'forward', nan_at_second_batch)
    work_dir = tmp_path / 'wd'
    assert _train(work_dir, data_options, 'train_cfg.max_iters=3',
                  *NO_VAL) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and 'error: non-finite loss at iteration 2' in err[0]
    assert 'training stopped before the optimizer step' in err[0]
    assert (work_dir / 'iter_1.pth').is_file()
    assert not (work_dir / 'iter_2.pth').exists()
    state = _load(work_dir / 'iter_1.pth')['state_dict']
    assert all(torch.isfinite(v.float()).all() for v in state.values())
    monkeypatch.setattr(SegDataPreProcessor, 'forward', forward)
    assert _train(work_dir, data_options, 'train_cfg.max_iters=2', *NO_VAL,
                  args=['--resume']) == 0


# ---- mixed precision ----------------------------------------------------------------
def test_bf16_amp_trains_mesa_50_iterations_without_nan(tmp_path, data_options):
    work_dir = tmp_path / 'wd'
    # no auxiliary head: 50 steps are the point, not the head (time)
    assert _train(work_dir, data_options, 'train_cfg.max_iters=50', *NO_VAL,
                  'model.auxiliary_head=None', 'default_hooks.logger.interval=10',
                  'default_hooks.checkpoint.interval=50', args=['--amp']) == 0
    dumped = (work_dir / 'tiny_upernet_swin.py').read_text()
    assert "type='CPUAmpOptimWrapper'" in dumped and 'bfloat16' in dumped
    ckpt = _load(work_dir / 'iter_50.pth')
    losses = _losses(ckpt)
    assert len(losses) == 50 and all(map(torch.isfinite, torch.tensor(losses)))
    state = ckpt['state_dict']
    assert all(torch.isfinite(v.float()).all() for v in state.values())
    initialized = {k: v for k, v in state.items() if k.endswith('.initialized')}
    second_copies = [k for k in initialized if is_store_once_second_copy(k)]
    assert second_copies and not any(initialized[k].any() for k in second_copies)
    assert all(v.all() for k, v in initialized.items() if k not in second_copies)
    shutil.rmtree(work_dir)



# ---- disk faults: a failed save keeps the previous checkpoint ----------------------
def test_failed_save_keeps_the_previous_checkpoint(tmp_path, data_options,
                                                   disk_full_on, capsys):
    """max_keep_ckpts=1 and the disk fills up while iteration 2 is saved:
    mmengine's CheckpointHook would have deleted iter_1.pth first."""
    work_dir = tmp_path / 'wd'
    work_dir.mkdir()
    # left by a save that was killed in an earlier run: removed at the start
    stale = work_dir / '.iter_7.pth.0123abcd.tmp'
    stale.write_bytes(b'half a checkpoint')
    disk_full_on('iter_2.pth')
    rc = _train(work_dir, data_options, 'train_cfg.max_iters=3', *NO_VAL,
                'default_hooks.checkpoint.max_keep_ckpts=1')
    disk_full_on(None)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 4 and len(err) == 1, err
    assert err[0].split(': error: ', 1)[1] == (
        f'cannot write checkpoint {work_dir}/iter_2.pth (No space left on '
        'device, ENOSPC) at iteration 2; training stopped, the previous '
        f'checkpoint {work_dir}/iter_1.pth is intact. Free space or fix the '
        'disk, then continue with --resume')
    files = sorted(f for f in os.listdir(work_dir) if not f[0].isdigit())
    assert files == ['iter_1.pth', 'last_checkpoint', 'tiny_upernet_swin.py']
    assert (work_dir / 'last_checkpoint').read_text() == \
        str(work_dir / 'iter_1.pth')
    assert _load(work_dir / 'iter_1.pth')['meta']['iter'] == 1
    log = open(glob.glob(str(work_dir / '2*' / '*.log'))[0]).read()
    assert f'removed {stale}: the incomplete write of iter_7.pth by a ' \
        'process that was killed while saving; iter_7.pth was never ' \
        'completed' in log
    # ... and it resumes from there
    assert _train(work_dir, data_options, 'train_cfg.max_iters=2', *NO_VAL,
                  args=['--resume']) == 0
    assert _load(work_dir / 'iter_2.pth')['meta']['iter'] == 2


# ---- a data file that goes bad mid-training --------------------------------------
def _break(root, fault):
    if fault == 'garbage':  # an annotation overwritten with something else
        for ann in (root / 'annotations' / 'training').iterdir():
            ann.write_bytes(b'\x89PNG but not really' * 10)
        return
    for img in (root / 'images' / 'training').iterdir():
        if fault == 'deleted':
            img.unlink()
        else:  # truncated: the copy was interrupted
            img.write_bytes(img.read_bytes()[:300])


@pytest.mark.parametrize('fault, problem', [
    ('deleted', r'images/training/ADE_train_\d+\.jpg is missing'),
    ('truncated', r'images/training/ADE_train_\d+\.jpg does not decode '),
    ('garbage', r'annotations/training/ADE_train_\d+\.png does not decode '),
])
def test_data_file_going_bad_mid_training(tmp_path, demo_root, monkeypatch,
                                          capsys, fault, problem):
    import multiprocessing
    from mmengine.runner import IterBasedTrainLoop
    root = tmp_path / 'ade'
    shutil.copytree(demo_root, root)
    run_iter = IterBasedTrainLoop.run_iter
    broken = []

    def break_before_iteration_1(loop, data_batch):
        if loop.iter == 0:
            _break(root, fault)
            broken.append(time.time())
        run_iter(loop, data_batch)

    monkeypatch.setattr(IterBasedTrainLoop, 'run_iter',
                        break_before_iteration_1)
    work_dir = tmp_path / 'wd'
    data = [f'{k}.dataset.data_root={root}'
            for k in ('train_dataloader', 'val_dataloader', 'test_dataloader')]
    rc = _train(work_dir, data, 'train_cfg.max_iters=5', *NO_VAL,
                'train_dataloader.num_workers=1')
    stopped = time.time() - broken[0]
    err = capsys.readouterr().err.strip().splitlines()
    with capsys.disabled():
        print(f'{fault}: stopped {stopped:.1f} s after the files broke')
    assert rc == 1 and len(err) == 1, err
    # when the files broke, batch 1 was taken and batches 2 and 3 requested
    # (the loader keeps two per worker in flight): the first broken batch is
    # that of iteration 4 (3 if the worker was slow to load)
    match = re.match(rf'iteration (\d): data file {root}/{problem}',
                     err[0].split(': error: ', 1)[1])
    assert match and match.group(1) in '34', err[0]
    last = int(match.group(1)) - 1
    assert err[0].endswith(
        f'training stopped, the last checkpoint, {work_dir}/iter_{last}.pth, '
        'is intact: restore the file (or remove the sample) and continue '
        'with --resume')
    assert _load(work_dir / f'iter_{last}.pth')['meta']['iter'] == last
    assert not (work_dir / f'iter_{last + 1}.pth').exists()
    # the dataloader worker is gone, not left hanging
    deadline = time.time() + 30
    while multiprocessing.active_children() and time.time() < deadline:
        gc.collect()
        time.sleep(0.2)
    assert not multiprocessing.active_children()


# ---- resuming on another number of ranks -----------------------------------------
def test_resume_on_another_world_size_is_refused_unless_allowed(
        tmp_path, data_options, monkeypatch, capsys):
    work_dir = tmp_path / 'wd'
    assert _train(work_dir, data_options, 'train_cfg.max_iters=1',
                  *NO_VAL) == 0
    ckpt_path = work_dir / 'iter_1.pth'
    ckpt = _load(ckpt_path)
    assert ckpt['meta']['world_size'] == 1 and 'rank_states' not in ckpt
    files = sorted(os.listdir(work_dir))

    # 1 rank -> 2 ranks: refused before the process group exists
    monkeypatch.setenv('WORLD_SIZE', '2')
    monkeypatch.setenv('RANK', '0')
    rc = _train(work_dir, data_options, 'train_cfg.max_iters=2', *NO_VAL,
                args=['--resume', '--launcher', 'pytorch'])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert err[0].split(': error: ', 1)[1] == (
        f'{ckpt_path} was trained on 1 rank, this run has '
        '2: the global batch, the data order and the per-rank state (RNG, '
        'running statistics) would change, so --resume would not continue '
        'the same run. Resume on 1 rank, or continue anyway (not equivalent '
        'to the uninterrupted run; the learning rate is not rescaled) with '
        '--cfg-options default_hooks.checkpoint.allow_world_size_change=True')
    monkeypatch.delenv('WORLD_SIZE')
    monkeypatch.delenv('RANK')

    # 2 ranks -> 1: the checkpoint as a 2-rank run writes it
    ckpt['meta']['world_size'] = 2
    ckpt['rank_states'] = [dict(buffers={}, random_state=ckpt['random_state'])
                           ] * 2
    torch.save(ckpt, ckpt_path)
    rc = _train(work_dir, data_options, 'train_cfg.max_iters=2', *NO_VAL,
                args=['--resume'])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1
    assert 'iter_1.pth was trained on 2 ranks, this run has 1' in err[0]
    assert sorted(os.listdir(work_dir)) == files  # nothing written

    assert _train(work_dir, data_options, 'train_cfg.max_iters=2', *NO_VAL,
                  'default_hooks.checkpoint.allow_world_size_change=True',
                  args=['--resume']) == 0
    log = open(sorted(glob.glob(str(work_dir / '2*' / '*.log')))[-1]).read()
    assert 'resuming a checkpoint of 2 ranks on 1 (allow_world_size_change):' \
        ' not equivalent to the uninterrupted run' in log
    assert _load(work_dir / 'iter_2.pth')['meta']['iter'] == 2
