"""mesa_seg.hooks: every hook registered and on in default_runtime;
PeakMemoryHook's peak memory in the training log lines (CPU path)."""
import glob
import os.path as osp
import uuid

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

import mesa_seg.hooks
from mesa_seg.hooks import PeakMemoryHook
from mesa_seg.hooks import peak_memory_hook as hooks_module

MiB = 1024 ** 2
SPIKE_MB = 192


class _Pairs(Dataset):

    def __init__(self, n=64):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        x = torch.full((2, ), float(i % 7))
        return dict(inputs=x, labels=x.sum(0, keepdim=True))


def _toy_model(spike_at):
    from mmengine.model import BaseModel

    class Toy(BaseModel):
        """A linear model that holds SPIKE_MB of memory during one forward."""

        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(2, 1)
            self.calls = 0

        def forward(self, inputs, labels=None, mode='tensor'):
            self.calls += 1
            if self.calls == spike_at:
                torch.ones(SPIKE_MB * MiB // 4).sum()  # written, so resident
            out = self.linear(inputs)
            return dict(loss=((out - labels)**2).mean()) if mode == 'loss' else out

    return Toy()


def _train(tmp_path, max_iters=6, interval=2, spike_at=3, samples=64, **logger):
    from mmengine.runner import Runner
    runner = Runner(
        model=_toy_model(spike_at),
        work_dir=str(tmp_path),
        experiment_name=f'peak_memory_{uuid.uuid4().hex[:8]}',
        train_dataloader=DataLoader(_Pairs(samples), batch_size=4, shuffle=False),
        train_cfg=dict(by_epoch=False, max_iters=max_iters),
        optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.01)),
        default_hooks=dict(logger=dict(type='LoggerHook', interval=interval, **logger),
                           checkpoint=None),
        custom_hooks=[dict(type='PeakMemoryHook')],
        log_processor=dict(by_epoch=False),
        default_scope=None)
    runner.train()
    return runner


@pytest.fixture
def cpu_only(monkeypatch):
    """The CPU path, also on machines with a GPU."""
    monkeypatch.setattr(hooks_module, 'is_cuda_available', lambda: False)
    monkeypatch.setattr(hooks_module, 'is_musa_available', lambda: False)


def test_registered_and_in_default_runtime():
    from mmengine.config import Config
    from mmengine.hooks import Hook
    from mmengine.registry import HOOKS
    assert isinstance(HOOKS.build(dict(type='PeakMemoryHook')), PeakMemoryHook)
    root = osp.dirname(osp.dirname(osp.abspath(__file__)))
    cfg = Config.fromfile(osp.join(root, 'configs', '_base_', 'default_runtime.py'))
    hooks = [name for name in mesa_seg.hooks.__all__
             if isinstance(getattr(mesa_seg.hooks, name), type)]
    assert sorted(hooks) == ['CheckpointCompatHook', 'LabelRangeHook',
                             'PeakMemoryHook', 'PreemptionHook',
                             'RandomStateHook', 'SafeCheckpointHook']
    for name in hooks:
        cls = getattr(mesa_seg.hooks, name)
        assert issubclass(cls, Hook) and HOOKS.get(name) is cls
        if name != 'SafeCheckpointHook':
            assert dict(type=name) in cfg.custom_hooks
    # the checkpoint hook is a default hook, set where mmseg sets it
    schedules = glob.glob(osp.join(root, 'configs', '_base_', 'schedules', '*.py'))
    assert len(schedules) == 4
    for path in schedules:
        checkpoint = Config.fromfile(path).default_hooks.checkpoint
        assert checkpoint.type == 'SafeCheckpointHook', path


def test_logs_peak_since_previous_line(tmp_path, cpu_only):
    runner = _train(tmp_path)
    # one value before training, then one per log line (iterations 2, 4, 6)
    values = runner.message_hub.get_scalar('train/memory').data[0].tolist()
    assert len(values) == 4
    start, first, spike, after = values
    # the spike happened in the second interval only: peak since the previous line
    assert spike >= first + 0.9 * SPIKE_MB
    assert after <= spike - 0.9 * SPIKE_MB
    assert first >= start - 16 > 0

    if not torch.cuda.is_available():  # on GPUs mmengine logs its own memory field
        log = open(glob.glob(osp.join(str(tmp_path), '*', '*.log'))[0]).read()
        lines = [line for line in log.splitlines() if 'Iter(train)' in line]
        assert len(lines) == 3
        assert all(line.count('memory: ') == 1 for line in lines)
        # placed like mmengine's CUDA field: before the losses
        assert all(line.index('memory: ') < line.index('loss: ') for line in lines)
        assert f'memory: {int(spike)}' in lines[1]


@pytest.mark.parametrize('ignore_last,lines', [(True, 2), (False, 3)])
def test_follows_logger_condition(tmp_path, cpu_only, ignore_last, lines):
    # LoggerHook writes after iterations 3 and 6 (interval 3) and, unless it
    # ignores the last short window, after 5 (the loader's 5 batches end); the
    # hook updates once before training and then exactly there.
    runner = _train(tmp_path, max_iters=7, interval=3, spike_at=None, samples=20,
                    ignore_last=ignore_last)
    assert len(runner.message_hub.get_scalar('train/memory').data[0]) == 1 + lines


def test_leaves_gpu_memory_field_to_mmengine(tmp_path, monkeypatch):
    monkeypatch.setattr(hooks_module, 'is_cuda_available', lambda: True)
    runner = _train(tmp_path, max_iters=2, spike_at=None)
    assert 'train/memory' not in runner.message_hub.log_scalars


# ---- PreemptionHook ----------------------------------------------------------------
def test_preemption_hook_saves_the_iteration_and_stops(tmp_path):
    """SIGTERM during iteration 3 of 6: the iteration finishes, iter_3.pth is
    saved (no periodic save was due) and Preempted stops the run."""
    import os
    import signal

    from mmengine.model import BaseModel
    from mmengine.runner import Runner

    from mesa_seg.errors import Preempted

    class Toy(BaseModel):

        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(2, 1)
            self.calls = 0

        def forward(self, inputs, labels=None, mode='tensor'):
            self.calls += 1
            if self.calls == 3:
                os.kill(os.getpid(), signal.SIGTERM)
            out = self.linear(inputs)
            return dict(loss=((out - labels)**2).mean()) if mode == 'loss' else out

    before = signal.getsignal(signal.SIGTERM)
    runner = Runner(
        model=Toy(),
        work_dir=str(tmp_path),
        experiment_name=f'preempt_{uuid.uuid4().hex[:8]}',
        train_dataloader=DataLoader(_Pairs(), batch_size=4, shuffle=False),
        train_cfg=dict(by_epoch=False, max_iters=6),
        optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.01)),
        default_hooks=dict(checkpoint=dict(type='SafeCheckpointHook',
                                           by_epoch=False, interval=100)),
        custom_hooks=[dict(type='PreemptionHook')],
        log_processor=dict(by_epoch=False),
        default_scope=None)
    with pytest.raises(Preempted) as stop:
        runner.train()
    assert str(stop.value) == (
        f'signal SIGTERM: stopped after iteration 3 of 6, saved '
        f'{tmp_path}/iter_3.pth; continue with --resume')
    assert signal.getsignal(signal.SIGTERM) is before  # handler put back
    assert sorted(f for f in os.listdir(tmp_path) if not f[0].isdigit()) \
        == ['iter_3.pth', 'last_checkpoint']
    ckpt = torch.load(tmp_path / 'iter_3.pth', weights_only=False)
    assert ckpt['meta']['iter'] == 3 and ckpt['meta']['world_size'] == 1


# ---- SafeCheckpointHook: the previous best survives a failed save --------------------
def test_best_checkpoint_is_replaced_only_after_the_new_one_is_written(
        tmp_path, disk_full_on):
    import os

    from mmengine.evaluator import BaseMetric
    from mmengine.runner import Runner

    from mesa_seg.errors import CheckpointSaveError

    scores = iter([1.0, 2.0, 3.0])

    class Score(BaseMetric):

        def process(self, data_batch, data_samples):
            self.results.append(0)

        def compute_metrics(self, results):
            return dict(score=next(scores))

    disk_full_on('best_score_iter_6')
    runner = Runner(
        model=_toy_model(None),
        work_dir=str(tmp_path),
        experiment_name=f'best_{uuid.uuid4().hex[:8]}',
        train_dataloader=DataLoader(_Pairs(), batch_size=4, shuffle=False),
        val_dataloader=DataLoader(_Pairs(4), batch_size=4, shuffle=False),
        val_evaluator=[Score()],
        train_cfg=dict(by_epoch=False, max_iters=6, val_interval=2),
        val_cfg=dict(),
        optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.01)),
        default_hooks=dict(checkpoint=dict(
            type='SafeCheckpointHook', by_epoch=False, interval=100,
            save_best='score', rule='greater')),
        log_processor=dict(by_epoch=False),
        default_scope=None)
    with pytest.raises(CheckpointSaveError) as err:
        runner.train()
    assert str(err.value).startswith(
        f'cannot write checkpoint {tmp_path}/best_score_iter_6.pth (No space '
        'left on device, ENOSPC) at iteration 6; training stopped, the '
        f'previous checkpoint {tmp_path}/best_score_iter_4.pth is intact')
    names = sorted(f for f in os.listdir(tmp_path) if f.endswith('.pth'))
    # iter_2's best was removed once iter_4's was written; iter_6.pth is the
    # last iteration's (saved before the validation)
    assert names == ['best_score_iter_4.pth', 'iter_6.pth']
