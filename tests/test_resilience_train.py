"""End-to-end faults through tools/train.py on the tiny demo set: exact resume,
a save killed half-way, a NaN that stops training, 50 bf16 AMP iterations."""
import glob
import os
import os.path as osp
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from mmengine.config import Config

import mesa_seg  # noqa: F401
import mesa_seg.mesa as mesa
from mesa_seg.apis import run_train
from mesa_seg.preflight import checkpoint_to_load

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
    threads, backend = torch.get_num_threads(), mesa.get_backend()
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    mesa.set_backend('eager')
    yield
    torch.set_num_threads(threads)
    mesa.set_backend(backend)
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
    from mesa_seg.apis import run_train
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
    initialized = [v for k, v in state.items() if k.endswith('.initialized')]
    assert initialized and all(v.all() for v in initialized)
    shutil.rmtree(work_dir)

