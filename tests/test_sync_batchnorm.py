"""MesaSyncBatchNorm (mesa_seg/mesa/sync_batchnorm.py) against torch.

Two gloo ranks, each with its half of a global batch, train a
``MesaSyncBatchNorm`` and torch's ``nn.SyncBatchNorm`` (same initial state)
for two steps (a contiguous, then a channels-last input), compared with:

(a) torch's ``nn.SyncBatchNorm`` on the same ranks: outputs, running
    statistics and the bias gradient (it does not read the input) bit for bit.
    torch's five sync-BN kernels exist for CUDA only and its module refuses CPU
    input; on CPU the reference is still torch's module and autograd Function
    (collectives, count handling, running-stat update, backward all-reduce),
    with only those five kernels replaced by ``CpuKernels`` and CPU admitted by
    its device check. With CUDA both run on the GPU, unpatched.
(b) one process running ``nn.BatchNorm2d`` on the whole global batch (the
    kernels' math, independently of ``CpuKernels``): outputs and running
    statistics close (another summation order), input/weight gradients within
    the 8-bit bound of tests/test_ops.py, bias gradient close; and the bytes
    each rank saves for backward, 1/4 of its fp32 input.
"""
import contextlib
import copy
import os
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
from torch import nn

import mesa_seg.mesa as mesa
from mesa_seg.mesa import (QUANTIZER_ATTRS, MesaSyncBatchNorm, QuantizerConfig,
                           mesa_modules, mesafy_)
from mesa_seg.mesa.sync_batchnorm import CpuKernels
from dist_utils import free_port, run_ranks
from mesa_utils import assert_grad_close, eager_by_default, saved_bytes  # noqa: F401

WORLD_SIZE, PER_RANK, CHANNELS, SIZE, STEPS = 2, 2, 8, 16, 2
SPAWN_TIMEOUT_S = 120
KERNELS = ('batch_norm_stats', 'batch_norm_gather_stats_with_counts', 'batch_norm_elemt',
           'batch_norm_backward_reduce', 'batch_norm_backward_elemt')
# Per rank: uint8 codes are 1/4 of the fp32 input; the per-channel ranges,
# mean/invstd and the rank counts add 136 B to the 16 KiB input (0.8%).
SAVED_RATIO_MAX = 0.26
# As the head policy converts SyncBN (HEAD_MESA_DEFAULTS): per-channel ranges
# widened to each batch, so no value saturates at the second step.
HEAD_QUANTIZER = QuantizerConfig(groups=CHANNELS, widen_to_batch=True)


def _bn(cls, **kwargs):
    torch.manual_seed(0)
    bn = cls(CHANNELS, **kwargs)
    with torch.no_grad():  # away from the identity, so the affine gradients matter
        bn.weight.copy_(1 + 0.3 * torch.randn(CHANNELS))
        bn.bias.copy_(0.3 * torch.randn(CHANNELS))
    return bn


def _global_batch(step: int):
    """Input and output cotangent of the whole batch at ``step``.

    The input has per-channel offsets and scales (the same at every step, as a
    layer's activations, which the running ranges track). The cotangent has a
    per-channel mean and a part along the normalised input, as a real loss's:
    the backward reductions (sum_dy, sum_dy_xmu) are then far from zero, and
    using one rank's sums instead of the all-reduced ones shows.
    """
    def per_channel(lo, hi):
        return torch.rand(1, CHANNELS, 1, 1, generator=g) * (hi - lo) + lo

    g = torch.Generator().manual_seed(100)
    scale, offset = per_channel(0.5, 3.5), per_channel(-2, 2)
    dy_mean, dy_slope = per_channel(-1, 1), per_channel(-0.5, 0.5)
    g.manual_seed(101 + step)
    shape = (WORLD_SIZE * PER_RANK, CHANNELS, SIZE, SIZE)
    z = torch.randn(shape, generator=g)
    return z * scale + offset, torch.randn(shape, generator=g) + dy_mean + dy_slope * z


def _memory_format(step: int):
    return torch.channels_last if step % 2 else torch.contiguous_format


def _train(module: nn.Module, rows: slice, device: str) -> dict:
    """``STEPS`` training forwards/backwards on ``rows`` of each global batch."""
    module.train()
    owned = list(module.parameters()) + list(module.buffers())
    steps = []
    for step in range(STEPS):
        # own storage: a view would count the whole batch as saved
        x, gy = (t[rows].to(device).clone(memory_format=_memory_format(step))
                 for t in _global_batch(step))
        x.requires_grad_()
        y, nbytes = saved_bytes(lambda: module(x), owned)
        gx, gw, gb = torch.autograd.grad(y, (x, module.weight, module.bias), gy)
        steps.append(dict(y=y, gx=gx, gw=gw, gb=gb, saved_bytes=nbytes,
                          input_bytes=x.numel() * x.element_size()))
    state = {k: v.clone() for k, v in module.state_dict().items()
             if k.split('.')[0] not in QUANTIZER_ATTRS}
    return _to_cpu(dict(steps=steps, state=state))


def _to_cpu(tree):
    if isinstance(tree, dict):
        return {k: _to_cpu(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_to_cpu(v) for v in tree]
    return tree.detach().cpu() if isinstance(tree, torch.Tensor) else tree


@contextlib.contextmanager
def _torch_sync_bn_on_cpu():
    """torch's SyncBatchNorm module and Function on CPU: its CUDA-only kernels
    replaced by CpuKernels, and CPU admitted by its device check (which accepts
    the private-use backend's name)."""
    saved = {name: getattr(torch, name) for name in KERNELS}
    backend_name = torch._C._get_privateuse1_backend_name
    try:
        for name in KERNELS:
            setattr(torch, name, getattr(CpuKernels, name))
        torch._C._get_privateuse1_backend_name = lambda: 'cpu'
        yield
    finally:
        torch._C._get_privateuse1_backend_name = backend_name
        for name, fn in saved.items():
            setattr(torch, name, fn)


def _rank(rank: int, port: int, out: str, device: str) -> None:
    torch.set_num_threads(1)
    mesa.set_backend('eager')  # no kernel compilation in the spawned ranks
    if device == 'cuda':
        torch.cuda.set_device(0)  # both ranks share the GPU; gloo stages via the host
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    # a collective one rank misses fails after 60 s instead of hanging
    dist.init_process_group('gloo', rank=rank, world_size=WORLD_SIZE,
                            timeout=timedelta(seconds=60))
    try:
        rows = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
        ref = _bn(nn.SyncBatchNorm).to(device)
        twin = MesaSyncBatchNorm.from_float(copy.deepcopy(ref), HEAD_QUANTIZER)
        patch = _torch_sync_bn_on_cpu() if device == 'cpu' else contextlib.nullcontext()
        with patch:
            torch_run = _train(ref, rows, device)
        results = dict(torch=torch_run, mesa=_train(twin, rows, device))
        torch.save(results, os.path.join(out, f'rank{rank}.pt'))
    finally:
        dist.destroy_process_group()


def _spawn(out: str, device: str) -> list:
    return run_ranks(_rank, (free_port(), out, device), out, WORLD_SIZE, SPAWN_TIMEOUT_S)


@pytest.fixture(scope='module')
def ranks(tmp_path_factory):
    return _spawn(str(tmp_path_factory.mktemp('sync_bn')), 'cpu')


def _assert_bit_identical_to_torch(ranks):
    for rank, r in enumerate(ranks):
        for step, (got, ref) in enumerate(zip(r['mesa']['steps'], r['torch']['steps'])):
            assert torch.equal(got['y'], ref['y']), (rank, step)
            assert torch.equal(got['gb'], ref['gb']), (rank, step)
            # both are the global batch's gradient: Mesa's from the 8-bit input
            assert_grad_close(ref['gx'], got['gx'], f'rank {rank} step {step} input grad')
            assert_grad_close(ref['gw'], got['gw'], f'rank {rank} step {step} weight grad')
        assert r['mesa']['state'].keys() == r['torch']['state'].keys()
        for key, value in r['torch']['state'].items():
            assert torch.equal(r['mesa']['state'][key], value), (rank, key)
    # every rank normalised with the global statistics: identical running stats
    for key, value in ranks[0]['mesa']['state'].items():
        assert torch.equal(ranks[1]['mesa']['state'][key], value), key


def test_outputs_and_running_stats_bit_identical_to_torch_sync_bn(ranks):
    _assert_bit_identical_to_torch(ranks)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
def test_outputs_and_running_stats_bit_identical_to_torch_sync_bn_on_cuda(tmp_path):
    """torch's own CUDA kernels and unpatched nn.SyncBatchNorm as reference."""
    _assert_bit_identical_to_torch(_spawn(str(tmp_path), 'cuda'))


def test_matches_batch_norm_of_the_whole_batch_in_one_process(ranks):
    bn = _bn(nn.BatchNorm2d)
    # each rank's weight/bias gradient is its own batch's; DDP sums (averages) them
    for step in range(STEPS):
        x, gy = (t.contiguous(memory_format=_memory_format(step))
                 for t in _global_batch(step))
        x.requires_grad_()
        y = bn(x)
        gx, gw, gb = torch.autograd.grad(y, (x, bn.weight, bn.bias), gy)
        steps = [r['mesa']['steps'][step] for r in ranks]
        torch.testing.assert_close(torch.cat([s['y'] for s in steps]), y.detach(),
                                   rtol=1e-5, atol=1e-5)
        assert_grad_close(gx, torch.cat([s['gx'] for s in steps]), f'step {step} input grad')
        assert_grad_close(gw, sum(s['gw'] for s in steps), f'step {step} weight grad')
        torch.testing.assert_close(sum(s['gb'] for s in steps), gb, rtol=1e-5, atol=1e-4)
    for key, value in bn.state_dict().items():
        torch.testing.assert_close(ranks[0]['mesa']['state'][key], value, rtol=1e-5,
                                   atol=1e-6, msg=key)


def test_each_rank_saves_a_quarter_of_its_fp32_input(ranks):
    for r in ranks:
        for got, ref in zip(r['mesa']['steps'], r['torch']['steps']):
            assert ref['saved_bytes'] >= ref['input_bytes']  # torch keeps the fp32 input
            assert 0.25 <= got['saved_bytes'] / got['input_bytes'] <= SAVED_RATIO_MAX


# ------------------------------------------------------------ single process
def test_mesafy_converts_sync_batchnorm_and_keeps_state_dict_keys():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, CHANNELS, 3),
                          nn.SyncBatchNorm(CHANNELS, eps=1e-3, momentum=0.3), nn.ReLU())
    keys = set(model.state_dict())
    mesafy_(model, dict(groups='channels'))
    bn = model[1]
    assert type(bn) is MesaSyncBatchNorm and isinstance(bn, nn.SyncBatchNorm)
    assert (bn.eps, bn.momentum, bn.quantizer.groups) == (1e-3, 0.3, CHANNELS)
    mesa_keys = set(model.state_dict())
    assert {k for k in mesa_keys if k.split('.')[1] not in QUANTIZER_ATTRS} == keys
    assert len(mesa_modules(model)) == 3
    plain = bn.to_float()
    assert type(plain) is nn.SyncBatchNorm and set(plain.state_dict()) == {
        k.split('.', 1)[1] for k in keys if k.startswith('1.')}


@pytest.mark.parametrize('momentum', [0.1, None])
def test_without_a_process_group_it_is_mesa_batch_norm(momentum):
    """As torch's SyncBatchNorm, it normalises the local batch when there is
    nothing to sync: bit-identical output and running statistics."""
    assert not dist.is_initialized()
    ref = _bn(nn.SyncBatchNorm, momentum=momentum)
    twin = MesaSyncBatchNorm.from_float(copy.deepcopy(ref), QuantizerConfig(groups=2))
    for step in range(STEPS):
        x, gy = _global_batch(step)
        xr, xm = x.clone().requires_grad_(), x.clone().requires_grad_()
        y_ref, bytes_ref = saved_bytes(lambda: ref(xr), list(ref.parameters()))
        y, nbytes = saved_bytes(lambda: twin(xm), list(twin.parameters()))
        assert torch.equal(y, y_ref)
        for a, b, what in zip(torch.autograd.grad(y_ref, (xr, ref.weight), gy),
                              torch.autograd.grad(y, (xm, twin.weight), gy),
                              ('input', 'weight')):
            assert_grad_close(a, b, what)
        assert nbytes / bytes_ref <= SAVED_RATIO_MAX
    for key, value in ref.state_dict().items():
        assert torch.equal(twin.state_dict()[key], value), key
    ref.eval(), twin.eval()
    x = _global_batch(STEPS)[0].requires_grad_()
    assert torch.equal(twin(x), ref(x))
