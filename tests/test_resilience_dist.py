"""Two ranks, gloo, CPU: with ``sync_stats=True`` every rank holds identical
running estimates after training steps; DDP training matches a single
process on the same global batch (each rank's own, pre-reduction losses and
gradients against the single process's); a NaN on one rank stops both
before the optimizer step; stochastic rounding draws other noise on each rank.

Both runs use mmengine's ``MMDistributedDataParallel`` as ``tools/train.py``
sets it up on CPU (``device_ids=None``, ``broadcast_buffers=False``: DDP does
not copy rank 0's buffers, so only ``sync_stats`` can make the estimates
agree). The heads use GroupNorm and no dropout here: BatchNorm statistics of
half a batch differ from those of the whole batch (SyncBN needs CUDA), and
dropout masks depend on how the batch is split, so with either no single
process computes the same thing.
"""
import os
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
from mmengine.config import Config
from mmengine.optim import OptimWrapper
from mmengine.structures import PixelData

import mesa_seg.mesa as mesa
from mesa_seg import register_all_modules
from mesa_seg.errors import NonFiniteLossError
from mesa_seg.mesa import ActivationQuantizer, QuantizerConfig, RunningRange
from mesa_seg.mesa.primitives import group_view, quantize

from dist_utils import free_port, run_ranks

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
SPAWN_TIMEOUT_S = 400  # both ranks, all variants; then the test fails

pytestmark = pytest.mark.slow

register_all_modules(init_default_scope=False)  # also in spawned ranks


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


def _grads_at_first_step(model, optim_wrapper) -> dict:
    """Records the gradients the optimizer's first step gets (after DDP's
    all-reduce in a distributed run)."""
    grads, step = {}, optim_wrapper.optimizer.step

    def recording_step(*args, **kwargs):
        if not grads:
            grads.update({n: p.grad.clone() for n, p in model.named_parameters()
                          if p.grad is not None})
        return step(*args, **kwargs)

    optim_wrapper.optimizer.step = recording_step
    return grads


def _record_local_grads(ddp, model) -> dict:
    """Each rank's own gradients of the first step, before DDP averages them
    (a comm hook sees every bucket before its all-reduce)."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
    names = {p: n for n, p in model.named_parameters()}
    local = {}

    def hook(state, bucket):
        if not local.get('done'):
            for p, g in zip(bucket.parameters(), bucket.gradients()):
                local[names[p]] = g.detach().clone()
        return default_hooks.allreduce_hook(None, bucket)

    ddp.register_comm_hook(None, hook)
    return local


def _packed_codes() -> dict:
    """Stochastic-rounding codes of one fixed input, from a quantizer built
    under a fixed seed (the same salt on every rank)."""
    torch.manual_seed(0)
    q = ActivationQuantizer(QuantizerConfig(groups=4))
    x = torch.randn(8, 64, 16, generator=torch.Generator().manual_seed(1))
    packed = q.pack(x)
    return dict(codes=packed.q, lo=packed.lo, rng=packed.rng, x=x,
                salt=q.rounding_salt.clone(), step=q.rounding_step.clone())


def _nan_on_rank_1(rank: int) -> dict:
    """One normal step, then a NaN in rank 1's activations only."""
    from mmengine.model import MMDistributedDataParallel
    model = _model(VARIANTS['sync_nearest'])
    ddp = MMDistributedDataParallel(module=model, device_ids=None,
                                    broadcast_buffers=False)
    optim = OptimWrapper(torch.optim.AdamW(model.parameters(), lr=1e-4))
    model.train()
    ddp.train_step(_batch(0, rank * PER_RANK, PER_RANK), optim)
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    adam_steps = [s['step'].clone() for s in optim.optimizer.state.values()]
    layer = next(m for n, m in model.named_modules()
                 if n.startswith('backbone.stages') and
                 isinstance(m, mesa.MesaLinear))

    def poison(module, args):
        x = args[0].clone()
        x.view(-1)[7] = float('nan')
        return (x, *args[1:])

    if rank == 1:
        layer.register_forward_pre_hook(poison)
    start, message = time.time(), None
    try:
        ddp.train_step(_batch(1, rank * PER_RANK, PER_RANK), optim)
    except NonFiniteLossError as e:
        message = str(e)
    return dict(
        message=message, seconds=time.time() - start,
        params_kept=all(torch.equal(v, params[k])
                        for k, v in model.named_parameters()),
        adam_kept=[s['step'] for s in optim.optimizer.state.values()] ==
        adam_steps)


def _rank(rank: int, port: int, out: str) -> None:
    from mmengine.model import MMDistributedDataParallel
    torch.set_num_threads(1)
    mesa.set_backend('eager')
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    # a collective one rank misses fails after 60 s instead of hanging
    dist.init_process_group('gloo', rank=rank, world_size=WORLD_SIZE,
                            timeout=timedelta(seconds=60))
    results = {}
    for name, policy in VARIANTS.items():
        model = _model(policy)
        ddp = MMDistributedDataParallel(
            module=model, device_ids=None, broadcast_buffers=False)
        local_grads, reduced = _record_local_grads(ddp, model), {}

        def step(i, optim):
            if i == 0:
                reduced['grads'] = _grads_at_first_step(model, optim)
            log_vars = ddp.train_step(
                _batch(i, rank * PER_RANK, PER_RANK), optim)
            local_grads['done'] = True
            return float(log_vars['loss'])  # this rank's own: not reduced

        losses = _train(model, step)
        local_grads.pop('done')
        results[name] = dict(losses=losses, estimates=_estimates(model),
                             local_grads=local_grads,
                             reduced_grads=reduced['grads'])
    results['codes'] = _packed_codes()
    results['nan'] = _nan_on_rank_1(rank)
    torch.save(results, os.path.join(out, f'rank{rank}.pt'))
    dist.destroy_process_group()


@pytest.fixture(scope='module')
def ranks(tmp_path_factory):
    out = str(tmp_path_factory.mktemp('dist'))
    return run_ranks(_rank, (free_port(), out), out, WORLD_SIZE, SPAWN_TIMEOUT_S)


def _single_process(policy: dict):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with mesa.use_backend('eager'):
            model = _model(policy)
            recorded = {}

            def step(i, optim):
                if i == 0:
                    recorded['grads'] = _grads_at_first_step(model, optim)
                return float(model.train_step(
                    _batch(i, 0, WORLD_SIZE * PER_RANK), optim)['loss'])

            losses = _train(model, step)
            return losses, _estimates(model), recorded['grads']
    finally:
        torch.set_num_threads(threads)


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
    losses, estimates, grads = _single_process(VARIANTS[name])
    # each rank's own loss, on its half of the batch: they differ; their mean
    # is the loss of the whole batch (a mean over pixels, equal halves)
    per_rank = torch.tensor([r[name]['losses'] for r in ranks])
    assert (per_rank[0] != per_rank[1]).all()
    got, ref = per_rank.mean(0), torch.tensor(losses)
    print(f'{name}: 2-rank vs 1-process loss, max relative difference '
          f'{((got - ref).abs() / ref).max():.2e}')
    torch.testing.assert_close(got, ref, rtol=rtol, atol=0)
    # gradients of the first step: each rank's own (before DDP's all-reduce)
    # differ; their mean is what every rank's optimizer got, and (same
    # rounding grid, round-to-nearest) the single process's gradient
    local = [r[name]['local_grads'] for r in ranks]
    assert set(local[0]) == set(grads) and len(grads) > 50
    assert any(not torch.equal(local[0][k], local[1][k]) for k in grads)
    mean = {k: (local[0][k] + local[1][k]) / 2 for k in grads}
    for r in ranks:
        for key, value in mean.items():
            torch.testing.assert_close(r[name]['reduced_grads'][key], value,
                                       rtol=1e-5, atol=1e-8)
    if name != 'sync_nearest':
        return  # stochastic: the noise depends on the rank and the batch slot
    for key, value in grads.items():
        torch.testing.assert_close(mean[key], value, rtol=1e-3,
                                   atol=1e-4 * value.abs().max().item())
    # the synced estimates are the global batch's
    for key, value in estimates.items():
        torch.testing.assert_close(ranks[0][name]['estimates'][key].float(),
                                   value.float(), rtol=1e-3, atol=1e-5)


def test_nan_on_one_rank_stops_every_rank_before_the_step(ranks):
    for rank, r in enumerate(ranks):
        nan = r['nan']
        assert nan['message'] is not None, f'rank {rank} did not stop'
        assert nan['message'].startswith('non-finite loss on rank 1 of 2')
        assert 'training stopped on every rank before the optimizer step' \
            in nan['message']
        # rank 1 saw the NaN and lists its loss terms
        assert ('decode.loss_ce=nan' in nan['message']) == (rank == 1)
        assert nan['params_kept'] and nan['adam_kept']
        assert nan['seconds'] < 30  # not a collective timeout (60 s)
        print(f'NaN on rank 1: rank {rank} stopped after {nan["seconds"]:.2f} s')


def test_stochastic_rounding_noise_differs_between_ranks(ranks):
    first, second = (r['codes'] for r in ranks)
    assert torch.equal(first['x'], second['x'])
    assert torch.equal(first['salt'], second['salt'])
    assert torch.equal(first['lo'], second['lo'])
    differ = (first['codes'] != second['codes']).float().mean()
    assert differ > 0.2, differ  # independent rounding of each value
    # a single process rounds as before: rank 0's seeds, unchanged formula
    with mesa.use_backend('eager'):  # as the ranks
        single = _packed_codes()
        assert torch.equal(single['codes'], first['codes'])
        step, salt = int(single['step']), int(single['salt'])
        x3 = group_view(single['x'], 4, -1)
        seed = torch.tensor((step * 1_000_003 + salt) % (2**31 - 1))
        assert torch.equal(quantize(x3, single['lo'], single['rng'], seed),
                           single['codes'])
