"""Faults in 2-rank gloo training through tools/dist_train.sh (torchrun):
preemption (SIGTERM to one rank) with exact resume, and a rank killed
mid-iteration. Each run has a hard timeout.

The fault is injected in the worker processes by a ``sitecustomize`` module
(on ``PYTHONPATH``, imported by every Python process at start-up), driven by
``MESA_TEST_FAULT=kind:rank:iteration``; it acts in ``parse_losses`` of that
iteration, i.e. after the forward pass, before backward.

Every run: Mesa on backbone and heads (stochastic rounding, per-rank running
ranges: ``sync_stats`` off), seed 0, deterministic, 3 iterations, checkpoints
at iterations 2 and 3, validation after iteration 3 only. One uninterrupted
run is the reference (it also covers what a plain 2-process launch must do).
"""
import glob
import os
import os.path as osp
import re
import socket
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from mesa_seg import register_all_modules

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
TINY = osp.join(REPO, 'tests', 'data', 'tiny_upernet_swin.py')
OPTIONS = [
    'model.type=MesaEncoderDecoder', 'model.mesa.groups=channels',
    'model.backbone.type=MesaSwinTransformer', 'randomness.seed=0',
    'randomness.deterministic=True', 'train_cfg.max_iters=3',
    'train_cfg.val_interval=3', 'default_hooks.checkpoint.interval=2'
]
RUN_TIMEOUT_S = 300  # a hung run fails the test instead of CI
STOP_BOUND_S = 60  # fault -> every process gone (measured: see README)

INJECT = textwrap.dedent('''
    import os
    if os.environ.get('MESA_TEST_FAULT') and 'RANK' in os.environ:
        kind, rank, iteration = os.environ['MESA_TEST_FAULT'].split(':')
        if os.environ['RANK'] == rank:
            import signal, time
            from mmengine.runner import loops
            run_iter = loops.IterBasedTrainLoop.run_iter

            def run_iter_with_fault(loop, data_batch):
                if loop.iter + 1 == int(iteration):
                    module = loop.runner.model.module
                    parse_losses = module.parse_losses

                    def faulty(losses):
                        print(f'FAULT {kind} at {time.time():.3f}', flush=True)
                        sig = dict(kill=signal.SIGKILL, term=signal.SIGTERM)
                        os.kill(os.getpid(), sig[kind])
                        return parse_losses(losses)

                    module.parse_losses = faulty
                return run_iter(loop, data_batch)

            loops.IterBasedTrainLoop.run_iter = run_iter_with_fault
''')

pytestmark = pytest.mark.slow

register_all_modules(init_default_scope=False)  # checkpoints load


def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


class Run:

    def __init__(self, done, work_dir, seconds):
        self.rc, self.work_dir, self.seconds = done.returncode, work_dir, seconds
        self.out = done.stdout + done.stderr
        self.end = time.time()

    def fault_time(self):
        return float(re.search(r'FAULT \w+ at ([\d.]+)', self.out).group(1))

    def lines(self, kind):
        """Our one-line messages (``train.py: KIND: ...``)."""
        return [line for line in self.out.splitlines()
                if line.startswith(f'train.py: {kind}: ')]

    def ckpt(self, name):
        return torch.load(osp.join(self.work_dir, name), map_location='cpu',
                          weights_only=True)


def _dist_train(tmp_path, name, data_options, fault=None, args=()):
    work_dir = str(tmp_path / name)
    inject = tmp_path / 'inject'
    inject.mkdir(exist_ok=True)
    (inject / 'sitecustomize.py').write_text(INJECT)
    env = dict(os.environ, PORT=str(_free_port()), PYTHON=sys.executable,
               OMP_NUM_THREADS='1', MESA_BACKEND='eager',
               PYTHONPATH=os.pathsep.join(
                   [str(inject), os.environ.get('PYTHONPATH', '')]))
    env.pop('MESA_TEST_FAULT', None)
    if fault:
        env['MESA_TEST_FAULT'] = fault
    start = time.time()
    done = subprocess.run(
        [osp.join(REPO, 'tools', 'dist_train.sh'), TINY, '2', '--work-dir',
         work_dir, *args, '--cfg-options', *data_options, *OPTIONS],
        env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    return Run(done, work_dir, time.time() - start)


@pytest.fixture(scope='module')
def reference(tmp_path_factory, data_options):
    """The uninterrupted 2-rank run."""
    run = _dist_train(tmp_path_factory.mktemp('faults'), 'reference',
                      data_options)
    assert run.rc == 0, run.out[-4000:]
    return run


def test_two_rank_launch(reference):
    log = open(glob.glob(osp.join(reference.work_dir, '2*', '*.log'))[0]).read()
    assert 'Distributed training: True' in log
    assert 'GPU number: 2' in log  # mmengine's name for the world size
    assert 'Iter(train) [3/3]' in log and 'mIoU' in log
    ckpt = reference.ckpt('iter_3.pth')
    assert ckpt['meta']['world_size'] == 2
    # every rank's buffers and RNG states, for exact resume
    states = ckpt['rank_states']
    assert len(states) == 2
    ranges = [k for k in states[0]['buffers'] if k.endswith('running_range')]
    assert len(ranges) > 50
    # without sync_stats each rank keeps its own running ranges
    assert any(not torch.equal(states[0]['buffers'][k],
                               states[1]['buffers'][k]) for k in ranges)
    assert all(torch.equal(ckpt['state_dict'][k], states[0]['buffers'][k])
               for k in ranges)


def _assert_same_checkpoint(got, ref):
    assert got['meta']['iter'] == ref['meta']['iter']
    for key, value in ref['state_dict'].items():
        assert torch.equal(got['state_dict'][key], value), key
    for ref_state, got_state in zip(ref['optimizer']['state'].values(),
                                    got['optimizer']['state'].values()):
        for name in ('step', 'exp_avg', 'exp_avg_sq'):
            assert torch.equal(got_state[name], ref_state[name])
    hub = 'message_hub', 'log_scalars', 'train/loss'
    losses = [c[hub[0]][hub[1]][hub[2]].data[0] for c in (got, ref)]
    assert list(losses[0]) == list(losses[1])
    for rank, (got_rank, ref_rank) in enumerate(zip(got['rank_states'],
                                                    ref['rank_states'])):
        for key, value in ref_rank['buffers'].items():
            assert torch.equal(got_rank['buffers'][key], value), (rank, key)
        assert torch.equal(got_rank['random_state']['torch'],
                           ref_rank['random_state']['torch'])


def test_preemption_saves_stops_every_rank_and_resumes_exactly(
        tmp_path, data_options, reference):
    # SIGTERM reaches rank 1 only, during iteration 1 (no periodic save due)
    run = _dist_train(tmp_path, 'wd', data_options, fault='term:1:1')
    stop = run.end - run.fault_time()
    print(f'preemption: all ranks gone {stop:.1f} s after SIGTERM')
    assert run.rc != 0, run.out[-4000:]
    assert stop < STOP_BOUND_S
    lines = run.lines('preempted')
    assert len(lines) == 2, run.out[-4000:]  # one line per rank, exit 75
    for rank, line in enumerate(lines and sorted(lines)):
        assert line.startswith(f'train.py: preempted: [rank {rank}] ')
        assert 'SIGTERM (on rank 1; all 2 ranks stopped here): stopped after ' \
            'iteration 1 of 3, saved ' in line
        assert line.endswith('iter_1.pth; continue with --resume')
    # torchrun's summary: the first rank to leave exits 75; torchrun then
    # SIGTERMs any rank still tearing down after its line (-15), a race
    failures, _, root_cause = run.out.partition('Root Cause')
    assert re.search(r'exitcode\s*: 75 ', root_cause), run.out[-4000:]
    others = re.findall(r'exitcode\s*: (-?\d+) ', failures)
    assert set(others) <= {'75', '-15'}, others
    assert [f for f in os.listdir(run.work_dir) if f.endswith('.pth')] == [
        'iter_1.pth']
    assert run.ckpt('iter_1.pth')['meta']['iter'] == 1

    resumed = _dist_train(tmp_path, 'wd', data_options, args=['--resume'])
    assert resumed.rc == 0, resumed.out[-4000:]
    for name in ('iter_2.pth', 'iter_3.pth'):
        _assert_same_checkpoint(resumed.ckpt(name), reference.ckpt(name))


def test_killed_rank_stops_the_others_with_one_line(tmp_path, data_options,
                                                     reference):
    run = _dist_train(tmp_path, 'wd', data_options, fault='kill:1:3')
    stop = run.end - run.fault_time()
    print(f'SIGKILL of rank 1: all ranks gone {stop:.1f} s later')
    assert run.rc != 0 and stop < STOP_BOUND_S, run.out[-4000:]
    [line] = run.lines('error')
    assert line.startswith('train.py: error: [rank 0] lost contact with the '
                           'other ranks at iteration 3 (')
    assert 'rank 1 did not answer. Stopped; the last checkpoint, ' in line
    assert 'iter_2.pth, is intact: continue with --resume once all 2 ranks ' \
        'run again' in line
    assert re.search(r'exitcode\s*: 3 ', run.out)  # rank 0, in torchrun's
    assert re.search(r'rank\s*: 1 \(local_rank: 1\)\s*\n\s*exitcode\s*: -9',
                     run.out)  # ... summary, which names the killed rank
    # the newest checkpoint is the uninterrupted run's (so resumes exactly)
    _assert_same_checkpoint(run.ckpt('iter_2.pth'),
                            reference.ckpt('iter_2.pth'))


# ---- a rank that hangs (alive, silent): the process group's timeout -------------
HANG = textwrap.dedent('''
    import datetime, os, signal, sys, time
    import torch, torch.distributed as dist
    from mesa_seg.distributed import (is_comm_failure, short_reason,
                                      unresponsive_ranks)
    rank, port, timeout = int(sys.argv[1]), sys.argv[2], float(sys.argv[3])
    dist.init_process_group(
        'gloo', init_method=f'tcp://127.0.0.1:{port}', rank=rank,
        world_size=2, timeout=datetime.timedelta(seconds=timeout))
    x = torch.ones(1)
    dist.all_reduce(x)
    if rank == 1:
        os.kill(os.getpid(), signal.SIGSTOP)  # a hung process: no answer
    start = time.time()
    try:
        dist.all_reduce(x)
    except RuntimeError as e:
        failed = time.time() - start
        print(f'{failed:.1f} {is_comm_failure(e)} {unresponsive_ranks(2.0)} '
              f'{short_reason(e)}', flush=True)
''')


def test_hung_rank_is_named_after_the_timeout(tmp_path):
    """The timeout of the process group (env_cfg.dist_cfg.timeout, passed on
    by mesa_seg.compat: test_compat.py) bounds the wait for a silent rank;
    then the rank that does not answer is named."""
    script = tmp_path / 'hang.py'
    script.write_text(HANG)
    port, timeout = str(_free_port()), 3
    ranks = [subprocess.Popen([sys.executable, str(script), str(r), port,
                               str(timeout)], stdout=subprocess.PIPE, text=True,
                              env=dict(os.environ, OMP_NUM_THREADS='1'))
             for r in range(2)]
    try:
        out, _ = ranks[0].communicate(timeout=120)
    finally:
        for p in ranks:
            p.kill()
            p.wait()
    seconds, comm_failure, silent = out.split(' ', 3)[:3]
    print(f'hung rank: rank 0 gave up after {seconds} s')
    assert timeout <= float(seconds) < timeout + 5
    assert comm_failure == 'True' and silent == '[1]', out
    assert 'Timed out' in out
