"""mesa_seg.mesa.audit: what autograd saves, and what a Mesa policy misses."""
import pytest
import torch
from torch import nn

from mesa_seg.mesa import audit_saved_tensors, format_audit, mesa_modules, mesafy_
from mesa_seg.mesa.audit import summarize
from mesa_utils import eager_by_default, saved_bytes  # noqa: F401  (fixture)
from test_modules_policy import Net


class Wrapped(nn.Module):
    """Net plus a functional op in the root's own forward."""

    def __init__(self):
        super().__init__()
        self.net = Net()

    def forward(self, x):
        return self.net(x).sigmoid()


def _model(policy=None, seed=0):
    torch.manual_seed(seed)
    model = Wrapped()
    return mesafy_(model, policy) if policy is not None else model


def _x():
    return torch.randn(2, 16, 16, generator=torch.Generator().manual_seed(1))


def _owned(model):
    return list(model.parameters()) + list(model.buffers())


def test_plain_model_everything_uncompressed_and_attributed():
    model = _model()
    records = audit_saved_tensors(model, _x())
    assert records and not any(r.compressed for r in records)
    by_module = {(r.module, r.op) for r in records}
    assert ('net.block.fc1', 'linear') in by_module
    assert ('net.block.act', 'gelu') in by_module
    assert ('net.block.attn.softmax', 'softmax') in by_module
    assert ('', 'sigmoid') in by_module  # functional op of the root itself
    # Unique storages, parameters and buffers excluded: the same count as ours.
    _, nbytes = saved_bytes(lambda: model(_x()), _owned(model))
    assert sum(r.nbytes for r in records) == nbytes


def test_converted_layers_are_compressed_and_misses_are_listed():
    model = _model(dict(exclude=[r'block\.fc1$']))
    records = audit_saved_tensors(model, _x())
    converted = {n for n, _ in mesa_modules(model)}
    assert 'net.block.fc1' not in converted
    # The un-converted layer shows up with its full-precision input.
    miss = [r for r in records if r.module == 'net.block.fc1' and not r.compressed]
    assert miss and miss[0].dtype == 'float32' and miss[0].nbytes == 2 * 16 * 16 * 4
    for name in converted:
        mine = [r for r in records if r.module == name]
        assert mine and all(r.compressed for r in mine), name
        # Beside the uint8 codes (or ReLU's bit mask) a Mesa op keeps only tiny
        # float32 statistics: per-group ranges, LayerNorm's per-token mean/rstd,
        # BatchNorm's per-channel mean/invstd.
        codes = sum(torch.Size(r.shape).numel() for r in mine if r.dtype == 'uint8')
        stats = [r for r in mine if r.dtype != 'uint8']
        assert all(r.dtype == 'float32' and 16 * torch.Size(r.shape).numel() <= codes
                   for r in stats), (name, stats)
    # All of it matches an independent count.
    _, nbytes = saved_bytes(lambda: model(_x()), _owned(model))
    assert sum(r.nbytes for r in records) == nbytes


def test_report_lists_only_what_the_policy_misses():
    model = _model(dict(exclude=[r'block\.fc1$']))
    report = format_audit(audit_saved_tensors(model, _x()), top=100)
    assert 'net.block.fc1' in report
    for name, _ in mesa_modules(model):
        assert name not in report.split(), name


def test_report_format():
    model = _model(dict(exclude=[r'block\.fc1$']))
    records = audit_saved_tensors(model, _x())
    report = format_audit(records, top=1)
    lines = report.splitlines()
    assert lines[0].startswith('saved for backward:') and 'uncompressed' in lines[0]
    # Largest miss first: fc1's fp32 input (2 KB) beats every statistic.
    assert 'net.block.fc1' in lines[2] and 'float32' in lines[2] and '[32, 16]' in lines[2]
    assert lines[-1].endswith('more uncompressed tensors')
    table = summarize(records, key=lambda r: r.module)
    assert table['net.block.fc1']['uncompressed'] == 2 * 16 * 16 * 4
    assert table['net.block.fc2']['compressed'] > 0


def test_forward_fn_mode_and_hooks_restored():
    model = _model(dict())
    model.eval()
    records = audit_saved_tensors(model, forward_fn=lambda: model(_x()).sum())
    assert any(r.compressed for r in records)  # ran in training mode
    assert not model.training
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())

    def boom():
        model(_x())
        raise RuntimeError('loss failed')

    with pytest.raises(RuntimeError, match='loss failed'):
        audit_saved_tensors(model, forward_fn=boom)
    assert not model.training
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
