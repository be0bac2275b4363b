"""On a CUDA GPU: every strategy trains (fp16 AMP with its dynamic loss scaler
stepping), Mesa's compiled kernels compile (no eager fallback), every Mesa op's
forward is bit-identical to torch's, and the measurement records CUDA peaks and
survives an out-of-memory step. Skipped without CUDA; run with
``pytest -m cuda`` (``tools/gpu_check.sh`` does)."""
import copy
import math
import os.path as osp

import pytest
import torch
from torch import nn

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')]

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
TINY = osp.join(REPO, 'tests', 'data', 'tiny_upernet_swin.py')
STRATEGIES = ['fp32', 'fused_loss', 'amp', 'cp', 'sac', 'mesa', 'mesa_amp', 'mesa_cp']


@pytest.fixture
def compile_backend():
    """Mesa's torch.compile kernels (Triton on CUDA), compiled afresh if an
    earlier failure in this process sent them to eager; none may fail here."""
    from mesa_seg.mesa import compile_failed, use_backend
    with use_backend('compile', retry=True):
        yield
        assert not compile_failed(), 'Mesa kernels fell back to eager'


@pytest.mark.parametrize('name', STRATEGIES)
def test_strategy_trains_on_cuda(name):
    from mesa_seg.memory.measure import RunSpec, build_training, load_cfg, synthetic_batch
    from mesa_seg.mesa import mesa_modules, use_backend
    cfg, size = load_cfg(RunSpec(config=TINY, size=(64, 64), strategy=name, device='cuda'))
    torch.manual_seed(0)
    model, optim_wrapper = build_training(cfg, 'cuda')
    amp = name.endswith('amp')
    assert type(optim_wrapper).__name__ == ('AmpOptimWrapper' if amp else 'OptimWrapper')
    assert (len(mesa_modules(model)) > 0) is name.startswith('mesa')
    assert next(model.parameters()).is_cuda

    outputs = []
    forward = model.decode_head.forward
    model.decode_head.forward = lambda *a, **k: outputs.append(forward(*a, **k)) or \
        outputs[-1]
    data = synthetic_batch(model, 2, size)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    stepped = False
    with use_backend('eager'):  # the kernels are the next tests' business
        for _ in range(4):  # fp16: the scaler skips steps whose gradients overflow
            log_vars = model.train_step(data, optim_wrapper)
            assert math.isfinite(float(log_vars['loss']))
            changed = sum(not torch.equal(before[n], p.detach())
                          for n, p in model.named_parameters())
            if changed > 0.9 * len(before):
                stepped = True
                break
    del model.decode_head.forward
    assert stepped, 'the optimizer never stepped'
    assert outputs[0].dtype == (torch.float16 if amp else torch.float32)
    if amp:
        scaler = optim_wrapper.loss_scaler
        assert scaler.is_enabled() and math.isfinite(scaler.get_scale())
        assert scaler.get_scale() > 1.0  # dynamic scaling, not disabled
        assert scaler._scale is not None and scaler._scale.is_cuda


def test_mesa_kernels_compile(compile_backend):
    from mesa_seg.mesa import get_backend, mesafy_
    assert get_backend() == 'compile'
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.LayerNorm(64),
                              nn.Linear(64, 32)).cuda()
        model = mesafy_(model, dict(groups=2)).train()
        x = torch.randn(4, 49, 32, device='cuda', requires_grad=True)
        with torch.autocast('cuda', dtype=dtype, enabled=dtype != torch.float32):
            y = model(x)
        y.float().square().mean().backward()
        assert torch.isfinite(x.grad).all()


def _cases():
    """Mesa layer type -> (torch module, input shapes, groups)."""
    from mesa_seg.mesa import MatMul
    return {
        'Linear': (lambda: nn.Linear(32, 64), [(4, 49, 32)], 2),
        'Conv2d': (lambda: nn.Conv2d(16, 16, 3, padding=1), [(2, 16, 12, 12)], 1),
        'LayerNorm': (lambda: nn.LayerNorm(32), [(4, 49, 32)], 2),
        'GELU': (lambda: nn.GELU(), [(4, 49, 64)], 2),
        'Softmax': (lambda: nn.Softmax(dim=-1), [(4, 2, 49, 49)], 2),
        'MatMul': (lambda: MatMul(), [(4, 2, 49, 16), (4, 2, 16, 49)], 2),
        'BatchNorm2d': (lambda: nn.BatchNorm2d(16), [(2, 16, 12, 12)], 1),
        # no process group: torch's and Mesa's SyncBatchNorm both run local batch norm
        'SyncBatchNorm': (lambda: nn.SyncBatchNorm(16), [(2, 16, 12, 12)], 1),
        'ReLU': (lambda: nn.ReLU(), [(2, 16, 12, 12)], 1),
        'MultiheadAttention': (lambda: nn.MultiheadAttention(32, 2, batch_first=True),
                               [(4, 49, 32)] * 3, 2),
    }


def test_every_mesa_layer_type_has_a_case():
    from mesa_seg.mesa.policy import LAYER_TYPES
    assert set(LAYER_TYPES) <= set(_cases())


def _outputs(y):
    return [t for t in (y if isinstance(y, tuple) else (y, )) if t is not None]


@pytest.mark.parametrize('precision', ['fp32', 'fp16 autocast'])
@pytest.mark.parametrize('layer', list(_cases()))
def test_mesa_forward_bit_exact_on_cuda(layer, precision, compile_backend):
    """Training mode: Mesa's output equals torch's bit for bit (dtype included)."""
    from mesa_seg.mesa import mesafy_
    from mesa_seg.mesa.policy import LAYER_TYPES
    if layer not in LAYER_TYPES:
        pytest.skip(f'{layer} is not a Mesa layer type here')
    make, shapes, groups = _cases()[layer]
    torch.manual_seed(0)
    ref = make().cuda().train()
    mesa = mesafy_(copy.deepcopy(ref), dict(groups=groups, layers=(layer, ))).train()
    assert type(mesa) is LAYER_TYPES[layer][1]
    xs = [torch.randn(s, device='cuda') for s in shapes]
    autocast = precision != 'fp32'
    for step in range(2):  # the first call initialises the running ranges
        xr = [x.clone().requires_grad_() for x in xs]
        xm = [x.clone().requires_grad_() for x in xs]
        with torch.autocast('cuda', dtype=torch.float16, enabled=autocast):
            yr, ym = _outputs(ref(*xr)), _outputs(mesa(*xm))
        assert len(yr) == len(ym)
        for a, b in zip(yr, ym):
            assert a.dtype == b.dtype, (step, a.dtype, b.dtype)
            assert torch.equal(a, b), (step, (a.float() - b.float()).abs().max().item())
        sum(y.float().square().mean() for y in ym).backward()
        assert all(torch.isfinite(x.grad).all() for x in xm)


def test_measure_records_cuda_peaks():
    from mesa_seg.memory.measure import RunSpec, measure
    result = measure(RunSpec(config=TINY, size=(64, 64), strategy='mesa', device='cuda',
                             steps=1))
    assert result['oom'] is False
    assert result['peak_source'] == 'torch.cuda.max_memory_allocated'
    assert 0 < result['step_start'] < result['peak'] <= result['peak_reserved']
    assert result['model']['loss'] == 'fused resize + CE, logits kept in 8 bits (Mesa)'
    assert result['activation']['compressed'] > 0


def test_measure_reports_out_of_memory():
    """A CUDA OOM step ends the measurement with oom=True (the benchmark reports
    the cell as failed) instead of a crash."""
    from mesa_seg.memory.measure import RunSpec, measure
    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction(64 * 2**20 / torch.cuda.get_device_properties(
        0).total_memory)
    try:
        result = measure(RunSpec(config=TINY, size=(512, 512), batch=8, strategy='fp32',
                                 device='cuda', steps=1))
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.cuda.empty_cache()
    assert result['oom'] is True and result['peak'] is None
