"""Each fix in mesa_seg.compat, one test (or a few) per fix."""
import importlib.util
import io
import pickle
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from mmengine.config import Config
from mmengine.logging import HistoryBuffer, MessageHub

from mesa_seg import compat

compat.apply()  # before mmseg is imported


# (a) mmcv-lite: mmcv.ops stand-in
def test_mmseg_models_import_on_mmcv_lite():
    import mmseg.models  # noqa: F401  (hard-imports mmcv.ops)
    from mmcv.ops import point_sample, sigmoid_focal_loss
    with pytest.raises(compat.MmcvOpsUnavailableError,
                       match=r'mmcv\.ops\.point_sample .*mim install'):
        point_sample(torch.zeros(1), torch.zeros(1))
    with pytest.raises(compat.MmcvOpsUnavailableError,
                       match='sigmoid_focal_loss'):
        sigmoid_focal_loss()


def test_optional_ops_keep_mmseg_fallbacks():
    # mmseg guards these with `except ModuleNotFoundError`; they must stay
    # "absent" rather than turning into stand-ins or ImportErrors.
    with pytest.raises(ModuleNotFoundError, match='CrissCrossAttention'):
        from mmcv.ops import CrissCrossAttention  # noqa: F401
    from mmseg.models.decode_heads import cc_head, psa_head
    assert cc_head.CrissCrossAttention is None
    assert psa_head.PSAMask is None
    assert not hasattr(sys.modules['mmcv.ops'], '__path__')


def test_apply_is_idempotent_and_steps_aside_for_full_mmcv(monkeypatch):
    stand_in = sys.modules['mmcv.ops']
    compat.apply()
    compat._install_mmcv_ops_stand_in()
    assert sys.modules['mmcv.ops'] is stand_in

    # full mmcv (mmcv._ext importable): nothing is installed
    monkeypatch.delitem(sys.modules, 'mmcv.ops')
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, 'find_spec', lambda name, *a: object()
        if name == 'mmcv._ext' else real_find_spec(name, *a))
    compat._install_mmcv_ops_stand_in()
    assert 'mmcv.ops' not in sys.modules


def test_importing_compat_changes_nothing():
    """Only apply() (run by register_all_modules / mesa_seg.models) patches."""
    code = ('import sys, mesa_seg.compat; '
            'from mmengine.registry import OPTIM_WRAPPERS; '
            'print("mmcv.ops" in sys.modules, '
            '"CPUAmpOptimWrapper" in OPTIM_WRAPPERS.module_dict)')
    done = subprocess.run([sys.executable, '-c', code], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ['False', 'False']


# (b) torch >= 2.6 weights_only loading of mmengine checkpoints
def test_mmengine_checkpoint_loads_with_weights_only(tmp_path):
    hub = MessageHub.get_instance('test_compat_ckpt')
    hub.update_scalar('train/loss', np.float64(0.5))
    hub.update_scalar('train/lr', 0.1)
    hub.update_info('iter', 3)
    ckpt = dict(
        meta=dict(iter=3, seed=np.int64(7), shape=np.zeros(2, np.float32)),
        message_hub=hub.state_dict(),
        state_dict=dict(w=torch.ones(2)))
    path = tmp_path / 'iter_3.pth'
    torch.save(ckpt, path)
    loaded = torch.load(path)  # torch's default: weights_only=True
    buf = loaded['message_hub']['log_scalars']['train/loss']
    assert isinstance(buf, HistoryBuffer)
    assert buf.mean() == 0.5 and loaded['meta']['seed'] == 7


def test_checkpoint_getattr_is_limited_to_history_buffer():
    assert compat._history_buffer_getattr(HistoryBuffer, 'min') is \
        HistoryBuffer.min
    with pytest.raises(pickle.UnpicklingError):
        compat._history_buffer_getattr(torch.Tensor, 'min')
    with pytest.raises(pickle.UnpicklingError):
        compat._history_buffer_getattr(HistoryBuffer, '__class__')

    class Evil:
        def __reduce__(self):
            return getattr, (torch.Tensor, 'add_')

    buf = io.BytesIO()
    torch.save(Evil(), buf)
    buf.seek(0)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(buf)


# (c) CPU distributed: gloo and device_ids=None
def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason='CPU-only path')
def test_setup_cpu_distributed(monkeypatch):
    import datetime

    import torch.distributed as dist
    cfg = Config(dict(find_unused_parameters=True,
                      env_cfg=dict(dist_cfg=dict(backend='nccl', timeout=7))))
    assert not compat.setup_cpu_distributed(cfg, 'none')
    init, calls = dist.init_process_group, []
    monkeypatch.setattr(dist, 'init_process_group',
                        lambda *a, **kw: calls.append(kw) or init(*a, **kw))
    for key in ('RANK', 'WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT'):
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(RuntimeError, match='dist_train.sh'):
        compat.setup_cpu_distributed(cfg, 'pytorch')

    monkeypatch.setenv('RANK', '0')
    monkeypatch.setenv('WORLD_SIZE', '1')
    monkeypatch.setenv('MASTER_ADDR', '127.0.0.1')
    monkeypatch.setenv('MASTER_PORT', str(_free_port()))
    try:
        assert compat.setup_cpu_distributed(cfg, 'pytorch')
        assert dist.get_backend() == 'gloo'
        # the config's timeout bounds how long a collective waits for a rank
        assert calls == [dict(backend='gloo',
                              timeout=datetime.timedelta(seconds=7))]
        assert cfg.model_wrapper_cfg['device_ids'] is None
        assert cfg.model_wrapper_cfg['find_unused_parameters'] is True
        from mmengine.model import MMDistributedDataParallel
        ddp = MMDistributedDataParallel(
            module=torch.nn.Linear(2, 2), device_ids=None)
        ddp(torch.ones(1, 2)).sum().backward()
    finally:
        dist.destroy_process_group()


def test_slurm_env_translation():
    env = compat._slurm_to_torchrun_env(
        dict(
            SLURM_PROCID='3',
            SLURM_NTASKS='4',
            SLURM_LOCALID='1',
            SLURM_NODELIST='n1',
            MASTER_ADDR='n1'))
    assert env == dict(
        RANK='3',
        WORLD_SIZE='4',
        LOCAL_RANK='1',
        MASTER_ADDR='n1',
        MASTER_PORT='29500')


# (d) SyncBN -> BN on CPU
def test_sync_bn_cfg_to_bn_builds_plain_bn():
    from mmseg.registry import MODELS
    from mmseg.utils import register_all_modules
    register_all_modules()
    norm = dict(type='SyncBN', requires_grad=True)
    model_cfg = dict(
        type='FCNHead',
        in_channels=4,
        channels=4,
        num_convs=1,
        num_classes=2,
        norm_cfg=norm)
    head = MODELS.build(compat.sync_bn_cfg_to_bn([model_cfg])[0])
    assert norm['type'] == 'BN'
    kinds = {type(m) for m in head.modules()}
    assert torch.nn.BatchNorm2d in kinds
    assert torch.nn.SyncBatchNorm not in kinds


# CPU AMP: bf16 autocast through the registered optimizer wrapper
def test_cpu_amp_optim_wrapper_autocasts_to_bf16():
    from mmengine.optim import build_optim_wrapper
    model = torch.nn.Linear(4, 4)
    wrapper = build_optim_wrapper(
        model,
        dict(
            type='CPUAmpOptimWrapper',
            optimizer=dict(type='SGD', lr=0.1)))
    with wrapper.optim_context(model):
        out = model(torch.ones(2, 4))
    assert out.dtype == torch.bfloat16
    before = model.weight.detach().clone()
    wrapper.update_params(out.float().sum())
    assert not torch.equal(before, model.weight)
    with pytest.raises(ValueError, match='bfloat16'):
        compat.CPUAmpOptimWrapper(
            optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            dtype='float16')
