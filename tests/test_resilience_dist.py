"""Two ranks, gloo, CPU: with ``sync_stats=True`` every rank holds identical
running estimates after training steps, and DDP training matches a single
process on the same global batch.

Both runs use mmengine's ``MMDistributedDataParallel`` as ``tools/train.py``
sets it up on CPU (``device_ids=None``, ``broadcast_buffers=False``: DDP does
not copy rank 0's buffers, so only ``sync_stats`` can make the estimates
agree). The heads use GroupNorm and no dropout here: BatchNorm statistics of
half a batch differ from those of the whole batch (SyncBN needs CUDA), and
dropout masks depend on how the batch is split, so with either no single
process computes the same thing.
"""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from mmengine.config import Config
from mmengine.optim import OptimWrapper
from mmengine.structures import PixelData

import mesa_seg  # noqa: F401
import mesa_seg.mesa as mesa
from mesa_seg.mesa import RunningRange

TINY = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data',
                    'tiny_upernet_swin.py')
WORLD_SIZE, PER_RANK, STEPS = 2, 2, 2
VARIANTS = {
    'sync': dict(sync_stats=True),
    'sync_nearest': dict(sync_stats=True, stochastic_rounding=False),
    'no_sync': dict(sync_stats=False),
}
# Loss of the 2-rank run vs one process on the global batch, relative. With
# round-to-nearest both runs do the same arithmetic up to the order of float
# sums (gradient all-reduce, batch reductions): 1e-5 (measured: equal). With
# stochastic rounding the rounding noise of an image depends on where it sits
# in the batch, so from step 2 on the weights differ by quantization noise:
# 1e-4 (measured 7e-8 after 3 steps at lr 1e-4; the bound leaves room for
# other kernels and longer runs).
RTOL_NEAREST, RTOL_STOCHASTIC = 1e-5, 1e-4

pytestmark = pytest.mark.slow


def _model(policy: dict):
    from mmengine.registry import DefaultScope
    from mmseg.registry import MODELS
    cfg = Config.fromfile(TINY).model
    norm = dict(type='GN', num_groups=8, requires_grad=True)
    cfg.update(type='MesaEncoderDecoder', mesa=dict(groups='channels',
                                                    **policy))
    cfg.backbone.update(type='MesaSwinTransformer', mesa=policy)
    for head in (cfg.decode_head, cfg.auxiliary_head):
        head.update(norm_cfg=norm, dropout_ratio=0.0)  # no per-sample RNG
    torch.manual_seed(0)
    with DefaultScope.overwrite_default_scope('mmseg'):
        return MODELS.build(cfg)


def _batch(step: int, first: int, count: int) -> dict:
    """Images ``first .. first + count - 1`` of the global batch of ``step``."""
    from mmseg.structures import SegDataSample
    g = torch.Generator().manual_seed(step)
    images = torch.randint(0, 256, (WORLD_SIZE * PER_RANK, 3, 64, 64),
                           generator=g, dtype=torch.uint8)
    labels = torch.randint(0, 150, (WORLD_SIZE * PER_RANK, 1, 64, 64),
                           generator=g)
    samples = []
    for i in range(first, first + count):
        sample = SegDataSample(metainfo=dict(
            img_shape=(64, 64), ori_shape=(64, 64), pad_shape=(64, 64)))
        sample.gt_sem_seg = PixelData(data=labels[i])
        samples.append(sample)
    return dict(inputs=list(images[first:first + count]), data_samples=samples)


def _estimates(model) -> dict:
    return {f'{name}.{buf}': value.clone()
            for name, m in model.named_modules() if isinstance(m, RunningRange)
            for buf, value in m._buffers.items()}


def _train(model, step_fn) -> list:
    optim = OptimWrapper(torch.optim.AdamW(model.parameters(), lr=1e-4))
    model.train()
    return [step_fn(step, optim) for step in range(STEPS)]


def _rank(rank: int, port: int, out: str) -> None:
    from mmengine.model import MMDistributedDataParallel
    torch.set_num_threads(1)
    mesa.set_backend('eager')
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    dist.init_process_group('gloo', rank=rank, world_size=WORLD_SIZE)
    results = {}
    for name, policy in VARIANTS.items():
        model = _model(policy)
        ddp = MMDistributedDataParallel(
            module=model, device_ids=None, broadcast_buffers=False)

        def step(i, optim):
            log_vars = ddp.train_step(
                _batch(i, rank * PER_RANK, PER_RANK), optim)
            loss = log_vars['loss'].detach().clone()
            dist.all_reduce(loss)
            return float(loss) / WORLD_SIZE

        results[name] = dict(losses=_train(model, step),
                             estimates=_estimates(model))
    torch.save(results, os.path.join(out, f'rank{rank}.pt'))
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@pytest.fixture(scope='module')
def ranks(tmp_path_factory):
    out = str(tmp_path_factory.mktemp('dist'))
    mp.start_processes(_rank, args=(_free_port(), out), nprocs=WORLD_SIZE,
                       join=True, start_method='spawn')
    return [torch.load(os.path.join(out, f'rank{r}.pt'), weights_only=True)
            for r in range(WORLD_SIZE)]


def _single_process(policy: dict):
    threads, backend = torch.get_num_threads(), mesa.get_backend()
    torch.set_num_threads(1)
    mesa.set_backend('eager')
    try:
        model = _model(policy)
        losses = _train(model, lambda i, optim: float(model.train_step(
            _batch(i, 0, WORLD_SIZE * PER_RANK), optim)['loss']))
        return losses, _estimates(model)
    finally:
        torch.set_num_threads(threads)
        mesa.set_backend(backend)


def test_synced_estimates_are_identical_on_every_rank(ranks):
    for name in ('sync', 'sync_nearest'):
        first, second = (r[name]['estimates'] for r in ranks)
        assert len(first) > 100
        for key, value in first.items():
            assert torch.equal(second[key], value), (name, key)
    # control: without sync_stats each rank tracks its own half batch
    first, second = (r['no_sync']['estimates'] for r in ranks)
    assert any(not torch.equal(second[k], v) for k, v in first.items()
               if k.endswith('running_range'))


@pytest.mark.parametrize('name, rtol', [('sync_nearest', RTOL_NEAREST),
                                        ('sync', RTOL_STOCHASTIC)])
def test_loss_matches_a_single_process_on_the_global_batch(ranks, name, rtol):
    losses, estimates = _single_process(VARIANTS[name])
    for rank in ranks:
        assert rank[name]['losses'] == ranks[0][name]['losses']
    got, ref = torch.tensor(ranks[0][name]['losses']), torch.tensor(losses)
    print(f'{name}: 2-rank vs 1-process loss, max relative difference '
          f'{((got - ref).abs() / ref).max():.2e}')
    torch.testing.assert_close(got, ref, rtol=rtol, atol=0)
    if name != 'sync_nearest':
        return  # stochastic: weights, hence activations, differ by noise
    # the synced estimates are the global batch's
    for key, value in estimates.items():
        torch.testing.assert_close(ranks[0][name]['estimates'][key].float(),
                                   value.float(), rtol=1e-3, atol=1e-5)
