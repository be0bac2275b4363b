"""mesa_seg.mesa.shared_ops: store-once Mesa ops, and the backbones using them.

A tensor two consecutive layers read is stored once: attention probabilities
(softmax -> av matmul), the input of two linears (PVT's q/kv at sr_ratio=1)
and an MLP's hidden activation (GELU -> fc2). Checked against torch (forward
bit-identical, gradients within the 8-bit bound) and against the unfused Mesa
path (``use_store_once(False)``, every layer its own copy): fewer saved bytes,
by exactly the copies dropped, and no worse gradients.
"""
import copy

# First: importing backbone_utils registers mesa-seg before mmseg is imported.
from backbone_utils import (checkpointing_saved_bytes, cloned_state_dict, fwd_bwd,
                            saved_bytes as backbone_saved_bytes)
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mesa_seg.mesa import (ActivationQuantizer, MatMul, MesaModule, MesaPolicy,
                           audit_saved_tensors, mesafy_, set_mesa_enabled)
from mesa_seg.mesa.shared_ops import (gelu_conv2d, gelu_project, probs_matmul,
                                      running_quantizer, shared_input_linears,
                                      softmax_matmul, use_store_once)
from mesa_utils import (GRAD_COSINE, assert_grad_close, eager_by_default,  # noqa: F401
                        grad_error, saved_bytes)


class Block(nn.Module):
    """q/kv linears over one input, attention, GELU MLP: every store-once site."""

    def __init__(self, c=24, heads=3, attn_drop=0., drop=0.):
        super().__init__()
        self.num_heads = heads
        self.q = nn.Linear(c, c)
        self.kv = nn.Linear(c, 2 * c)
        self.qk = MatMul()
        self.softmax = nn.Softmax(dim=-1)
        self.attn_drop = nn.Dropout(attn_drop)
        self.av = MatMul()
        self.fc1 = nn.Linear(c, 2 * c)
        self.act = nn.GELU()
        self.drop = nn.Dropout(drop)
        self.fc2 = nn.Linear(2 * c, c)

    def forward(self, x):
        B, N, C = x.shape
        heads = self.num_heads
        q, kv = shared_input_linears(x, (self.q, self.kv))
        q = q.reshape(B, N, heads, -1).transpose(1, 2)
        k, v = kv.reshape(B, N, 2, heads, -1).permute(2, 0, 3, 1, 4)
        scores = self.qk(q, k.transpose(-2, -1)) * (C // heads)**-0.5
        attn = probs_matmul(scores, v, self.softmax, self.attn_drop, self.av)
        x = x + attn.transpose(1, 2).reshape(B, N, C)
        return x + gelu_project(self.fc1(x), self.act, self.drop, self.fc2)


def _pair(seed=0, dtype=torch.float32, **kwargs):
    torch.manual_seed(seed)
    ref = Block(**kwargs).to(dtype)
    return ref, mesafy_(copy.deepcopy(ref))


def _step(model, x, seed=1):
    """Forward + backward of a fixed projection: output, gradients (input
    last), bytes autograd saved (parameters and buffers excluded)."""
    model.train()
    x = x.clone().requires_grad_(True)
    torch.manual_seed(seed)
    y, nbytes = saved_bytes(lambda: model(x), list(model.parameters()) + list(model.buffers()))
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed)).to(y.dtype)
    params = list(model.parameters())
    grads = torch.autograd.grad(y, params + [x], g)
    names = [n for n, _ in model.named_parameters()] + ['input']
    return y.detach(), dict(zip(names, grads)), nbytes


def _x(dtype=torch.float32, shape=(2, 16, 24)):
    return torch.randn(shape, generator=torch.Generator().manual_seed(3)).to(dtype)


# ------------------------------------------------------------------ one block
def test_block_forward_exact_gradients_close():
    ref, model = _pair()
    x = _x()
    y_ref, g_ref, _ = _step(ref, x)
    y, g, _ = _step(model, x)
    with use_store_once(False):
        y_un, g_un, _ = _step(model, x)
    assert torch.equal(y, y_ref) and torch.equal(y_un, y_ref)
    for name in g_ref:
        assert_grad_close(g_ref[name], g[name], f'store-once {name}')
        assert_grad_close(g_ref[name], g_un[name], f'unfused {name}')
    # One copy instead of two is no less accurate: the same error on the whole.
    flat = [torch.cat([d[k].flatten() for k in g_ref]) for d in (g_ref, g, g_un)]
    rel_once, _ = grad_error(flat[0], flat[1])
    rel_unfused, _ = grad_error(flat[0], flat[2])
    assert rel_once <= 1.5 * rel_unfused, (rel_once, rel_unfused)


def test_block_saves_exactly_the_dropped_copies_fewer():
    ref, model = _pair()
    x = _x()
    _, _, nbytes = _step(model, x)
    with use_store_once(False):
        _, _, nbytes_unfused = _step(model, x)
    B, N, C = x.shape
    heads = model.num_heads

    def copy_bytes(numel, quantizer):  # uint8 codes + fp32 lo and range per group
        return numel + 2 * 4 * quantizer.groups

    dropped = (copy_bytes(B * heads * N * N, model.av.quantizer_a)  # probabilities
               + copy_bytes(B * N * C, model.kv.quantizer)  # q/kv input
               + copy_bytes(B * N * 2 * C, model.fc2.quantizer))  # GELU output
    assert nbytes == nbytes_unfused - dropped, (nbytes, nbytes_unfused, dropped)


def test_store_once_uses_the_first_quantizer_and_leaves_the_second():
    _, model = _pair()
    _step(model, _x())
    used = (model.softmax.quantizer, model.av.quantizer_b, model.act.quantizer,
            model.q.quantizer, model.fc1.quantizer, model.qk.quantizer_a)
    unused = (model.av.quantizer_a, model.kv.quantizer, model.fc2.quantizer)
    assert all(bool(q.initialized.all()) for q in used)
    assert not any(bool(q.initialized.any()) or int(q.rounding_step) for q in unused)
    with use_store_once(False):
        _step(model, _x())
    assert all(bool(q.initialized.all()) for q in used + unused)


def test_active_dropout_falls_back_to_separate_copies():
    ref, model = _pair(attn_drop=0.2, drop=0.2)
    x = _x()
    y_ref, g_ref, _ = _step(ref, x)
    y, g, nbytes = _step(model, x)
    state = cloned_state_dict(model)
    _, model_unfused = _pair(attn_drop=0.2, drop=0.2)
    with use_store_once(False):
        y_un, g_un, nbytes_unfused = _step(model_unfused, x)
    assert torch.equal(y, y_ref)  # torch's dropout draws
    # Only the q/kv input (no dropout there) is still shared.
    assert torch.equal(y, y_un)
    assert nbytes == nbytes_unfused - (x.numel() + 2 * 4 * model.kv.quantizer.groups)
    assert bool(state['av.quantizer_a.initialized'].all())
    assert bool(state['fc2.quantizer.initialized'].all())
    for name in g_ref:
        assert_grad_close(g_ref[name], g[name], name)


@pytest.mark.parametrize('mode', ['eval', 'mesa_off', 'no_input_grad'])
def test_plain_paths_unchanged(mode):
    ref, model = _pair()
    x = _x()
    if mode == 'eval':
        ref.eval()
        model.eval()
        with torch.no_grad():
            assert torch.equal(model(x), ref(x))
        # Eval with autograd: torch's own ops, torch's own saves and gradients.
        x = x.requires_grad_(True)
        y_ref, nbytes_ref = saved_bytes(lambda: ref(x), ref.parameters())
        y, nbytes = saved_bytes(lambda: model(x), model.parameters())
        assert torch.equal(y, y_ref) and nbytes == nbytes_ref
        return
    if mode == 'mesa_off':
        assert set_mesa_enabled(model, False) > 0
        y_ref, g_ref, n_ref = _step(ref, x)
        y, g, nbytes = _step(model, x)
        assert torch.equal(y, y_ref) and nbytes == n_ref
        assert all(torch.equal(g[k], g_ref[k]) for k in g_ref)
        return
    # Frozen parameters and an input without gradient: nothing to store.
    for m in (ref, model):
        m.train().requires_grad_(False)
    y_ref, nbytes_ref = saved_bytes(lambda: ref(x))
    y, nbytes = saved_bytes(lambda: model(x))
    assert torch.equal(y, y_ref) and nbytes == nbytes_ref == 0


def test_audit_attributes_store_once_saves_to_the_owning_layer():
    _, model = _pair()
    records = audit_saved_tensors(model, _x())
    assert records and all(r.compressed for r in records if r.nbytes), records
    modules = {r.module for r in records}
    assert {'q', 'softmax', 'act'} <= modules
    assert not {'kv', 'fc2'} & modules  # their copies are the ones dropped
    assert running_quantizer() is None


def _assert_exact_under_autocast(device: str, dtype: torch.dtype):
    ref, model = _pair()
    ref, model, x = ref.to(device), model.to(device), _x().to(device)
    results = []
    for m in (ref, model):
        with torch.autocast(device, dtype=dtype):
            y = m.train()(x)
        results.append((y, torch.autograd.grad(y.float().square().mean(),
                                               list(m.parameters()))))
    (y_ref, g_ref), (y, g) = results
    assert torch.equal(y, y_ref)
    for (name, _), a, b in zip(ref.named_parameters(), g_ref, g):
        # low-precision gradients carry their own rounding on top of the 8-bit error
        assert_grad_close(a, b, name, rel_l2=0.05, cosine=0.998)


def test_autocast_bf16():
    _assert_exact_under_autocast('cpu', torch.bfloat16)


def test_autocast_non_contiguous_hidden():
    """PVTv2's hidden activation is a transposed view. On it, F.linear runs
    matmul, whose kernel (one mm, or a bmm: other bf16 bits at this width)
    depends on whether the autocast weight copy requires grad, as it does in
    torch's forward."""
    torch.manual_seed(0)
    act, fc2 = nn.GELU(), nn.Linear(512, 128)
    mesa_act, mesa_fc2 = mesafy_(copy.deepcopy(act)), mesafy_(copy.deepcopy(fc2))
    h = torch.randn(2, 512, 64).transpose(1, 2).requires_grad_(True)
    assert not h.is_contiguous()
    results = []
    for a, fc in ((act, fc2), (mesa_act, mesa_fc2)):
        with torch.autocast('cpu', dtype=torch.bfloat16):
            y = gelu_project(h, a, None, fc)
        assert y.dtype == torch.bfloat16
        results.append((y, torch.autograd.grad(y.float().square().mean(),
                                               [h, *fc.parameters()])))
    (y_ref, g_ref), (y, g) = results
    assert torch.equal(y, y_ref)
    for a, b in zip(g_ref, g):
        assert_grad_close(a, b, rel_l2=0.05, cosine=0.998)


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
def test_cuda_fp16_autocast():
    """CUDA autocast runs softmax in float32 and the matmuls in float16: the
    store-once ops cast as the separate ops do."""
    _assert_exact_under_autocast('cuda', torch.float16)


def test_low_precision_parameters():
    ref, model = _pair(dtype=torch.bfloat16)
    x = _x(torch.bfloat16)
    y_ref, g_ref, _ = _step(ref, x)
    y, g, _ = _step(model, x)
    assert y.dtype == torch.bfloat16 and torch.equal(y, y_ref)
    for name in g_ref:
        assert_grad_close(g_ref[name], g[name], name, rel_l2=0.05, cosine=0.998)


# ----------------------------------------------------- the functional ops
@pytest.mark.parametrize('needs', ['all', 'input_only', 'weight_only', 'bias_only'])
def test_gelu_conv2d(needs):
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 8, 1)
    h = torch.randn(2, 16, 6, 6)
    h.requires_grad_(needs in ('all', 'input_only'))
    conv.weight.requires_grad_(needs in ('all', 'weight_only'))
    conv.bias.requires_grad_(needs in ('all', 'bias_only'))
    leaves = [t for t in (h, conv.weight, conv.bias) if t.requires_grad]
    quantizer = ActivationQuantizer(dim=1)
    y_ref = conv(F.gelu(h))
    y = gelu_conv2d(h, 'none', conv.weight, conv.bias, conv.stride, conv.padding,
                    conv.dilation, conv.groups, quantizer)
    assert torch.equal(y, y_ref)
    g_out = torch.randn_like(y)
    for a, b in zip(torch.autograd.grad(y_ref, leaves, g_out),
                    torch.autograd.grad(y, leaves, g_out)):
        if needs == 'bias_only':
            assert torch.equal(a, b)  # reads no activation
        else:
            assert_grad_close(a, b, needs)


@pytest.mark.parametrize('which', ['scores', 'v'])
def test_softmax_matmul_one_operand_needs_grad(which):
    torch.manual_seed(0)
    scores = torch.randn(2, 1, 8, 8, requires_grad=which == 'scores')
    v = torch.randn(2, 1, 8, 4, requires_grad=which == 'v')
    leaf = scores if which == 'scores' else v
    y_ref = torch.matmul(torch.softmax(scores, -1), v)
    quant_p, quant_v = ActivationQuantizer(dim=1), ActivationQuantizer(dim=1)
    y, nbytes = saved_bytes(lambda: softmax_matmul(scores, v, -1, quant_p, quant_v))
    assert torch.equal(y, y_ref)
    g = torch.randn_like(y)
    assert_grad_close(torch.autograd.grad(y_ref, leaf, g)[0], torch.autograd.grad(y, leaf, g)[0])
    # The gradient of v reads the probabilities only; that of the scores both.
    probs_codes = scores.numel() + 2 * 4
    assert nbytes == probs_codes + (v.numel() + 2 * 4 if which == 'scores' else 0)
    assert bool(quant_v.initialized.any()) == (which == 'scores')


# ------------------------------------------------------------- backbones
def _swin(mesa=dict(), **kwargs):
    from mesa_seg.models.backbones.swin import MesaSwinTransformer
    torch.manual_seed(0)
    return MesaSwinTransformer(embed_dims=16, depths=(2, 1), num_heads=(1, 2),
                               strides=(4, 2), out_indices=(0, 1), window_size=4,
                               drop_path_rate=kwargs.pop('drop_path_rate', 0.),
                               mesa=mesa, **kwargs)


PVT_ARCH = dict(embed_dims=[8, 16, 24, 32], depths=[1, 1, 1, 1], num_heads=[1, 2, 3, 4],
                mlp_ratios=[2, 2, 2, 2], sr_ratios=[8, 4, 2, 1])


def _pvt(mesa=dict(), **kwargs):
    from mesa_seg.models.backbones import MesaPVT
    torch.manual_seed(0)
    return MesaPVT(arch=PVT_ARCH, drop_path_rate=kwargs.pop('drop_path_rate', 0.),
                   mesa=mesa, **kwargs)


def _pvt_v2(mesa=dict(), **kwargs):
    from mesa_seg.models.backbones import MesaPVTv2
    torch.manual_seed(0)
    return MesaPVTv2(arch=PVT_ARCH, drop_path_rate=kwargs.pop('drop_path_rate', 0.),
                     mesa=mesa, **kwargs)


def _mit(mesa=dict(), **kwargs):
    from mesa_seg.models.backbones.mit import MesaMixVisionTransformer
    torch.manual_seed(0)
    return MesaMixVisionTransformer(embed_dims=8, num_layers=[1, 1, 1, 1],
                                    num_heads=[1, 2, 4, 8],
                                    drop_path_rate=kwargs.pop('drop_path_rate', 0.),
                                    mesa=mesa, **kwargs)


def _vit(mesa=dict(), **kwargs):
    from mesa_seg.models.backbones.vit import MesaVisionTransformer
    torch.manual_seed(0)
    model = MesaVisionTransformer(img_size=(32, 32), patch_size=8, embed_dims=16,
                                  num_layers=2, num_heads=2, out_indices=(0, 1),
                                  drop_path_rate=kwargs.pop('drop_path_rate', 0.),
                                  mesa=mesa, **kwargs)
    # Not the zero class token and position embedding of construction: the
    # class token's LayerNorm row would be constant (rstd = 1/sqrt(eps)), where
    # any 8-bit copy's error is amplified a thousandfold.
    model.init_weights()
    return model


BACKBONES = {'swin': _swin, 'pvt': _pvt, 'pvt_v2': _pvt_v2, 'mit': _mit, 'vit': _vit}
# Layers whose copy the store-once path drops: their quantizers stay in the
# model (old checkpoints carry their state) but are no longer updated.
DROPPED = {
    'swin': ('stages.0.blocks.0.attn.w_msa.av_matmul.quantizer_a',
             'stages.0.blocks.0.ffn.layers.1.quantizer'),
    'pvt': ('block1.0.attn.av_matmul.quantizer_a', 'block1.0.mlp.fc2.quantizer',
            'block4.0.attn.kv.quantizer'),
    'pvt_v2': ('block1.0.attn.av_matmul.quantizer_a', 'block1.0.mlp.fc2.quantizer',
               'block4.0.attn.kv.quantizer'),
    'mit': ('layers.0.1.0.ffn.layers.4.quantizer', ),
    'vit': ('layers.0.ffn.layers.1.quantizer', ),
}


def _x_for(arch):
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))


def _quantizer_state_keys(model):
    return {f'{name}.{buf}' for name, m in model.named_modules(remove_duplicate=False)
            if isinstance(m, ActivationQuantizer) for buf in m._buffers}


@pytest.mark.parametrize('arch', sorted(BACKBONES))
def test_backbone_exact_forward_fewer_bytes_close_gradients(arch):
    build = BACKBONES[arch]
    model, plain = build(), build(mesa=None)
    plain.load_state_dict(model.state_dict(), strict=False)
    x = _x_for(arch)
    outs_ref, grads_ref = fwd_bwd(plain, x)
    outs, grads = fwd_bwd(model, x)
    nbytes = backbone_saved_bytes(model, x)
    with use_store_once(False):
        outs_un, grads_un = fwd_bwd(model, x)
        nbytes_unfused = backbone_saved_bytes(model, x)
    for o, o_un, o_ref in zip(outs, outs_un, outs_ref):
        assert torch.equal(o, o_ref) and torch.equal(o_un, o_ref)
    assert grads.keys() == grads_ref.keys()
    flat = [torch.cat([d[k].flatten() for k in grads_ref]) for d in (grads_ref, grads, grads_un)]
    (rel, cos), (rel_unfused, _) = grad_error(flat[0], flat[1]), grad_error(flat[0], flat[2])
    assert cos >= GRAD_COSINE, cos
    # Per-run noise: over seeds the two errors differ by up to ~1.5x either way.
    assert rel <= 2 * rel_unfused, (rel, rel_unfused)
    assert nbytes < nbytes_unfused, (nbytes, nbytes_unfused)


@pytest.mark.parametrize('arch', sorted(BACKBONES))
def test_backbone_state_dict_keys_unchanged_old_checkpoints_load(arch):
    from mesa_seg.models.checkpoint import match_state_dict
    build = BACKBONES[arch]
    model, plain = build(), build(mesa=None)
    # Keys: torch's own plus every Mesa layer's quantizers, the dropped copies'
    # included (MiT registers its GELU under two names: both count).
    expected = set(plain.state_dict()) | {
        f'{name}.{q}.{buf}' for name, m in model.named_modules(remove_duplicate=False)
        if isinstance(m, MesaModule) for q in m._quantized for buf in getattr(m, q)._buffers}
    assert set(model.state_dict()) == expected
    assert set(model.state_dict()) - set(plain.state_dict()) == _quantizer_state_keys(model)
    for name in DROPPED[arch]:
        assert f'{name}.running_range' in expected, name
    # A checkpoint of a run where every layer stored its own copy.
    x = _x_for(arch)
    with use_store_once(False):
        fwd_bwd(model, x)
    old = cloned_state_dict(model)
    for name in DROPPED[arch]:
        assert bool(old[f'{name}.initialized'].all()), name
    fresh = build()
    assert match_state_dict(fresh, old) == ([], [])
    fresh.load_state_dict(old, strict=True)
    # Training on: the dropped copies' quantizers keep the loaded state.
    fwd_bwd(fresh, x)
    after = fresh.state_dict()
    for name in DROPPED[arch]:
        for buf in ('running_min', 'running_range', 'rounding_step'):
            key = f'{name}.{buf}'
            assert torch.equal(after[key], old[key]), key
    # ... while the quantizers making the shared copies moved on.
    assert any(not torch.equal(after[k], old[k]) for k in after if k.endswith('running_range'))


@pytest.mark.parametrize('arch', ['swin', 'pvt', 'pvt_v2', 'mit'])
def test_backbone_with_cp_exact_on_the_store_once_path(arch):
    """with_cp True and 'selective' replay the store-once ops bit for bit:
    outputs, gradients and quantizer state as without checkpointing (drop
    path on, dropout off so the store-once path runs)."""
    build = BACKBONES[arch]
    x = _x_for(arch)
    nbytes = checkpointing_saved_bytes(
        lambda mode: build(with_cp=mode, drop_path_rate=0.3), x)
    assert nbytes[True] < nbytes[False], nbytes


def test_backbone_policy_without_softmax_keeps_separate_path():
    """A policy leaving a layer of a pair in full precision: no store-once op,
    the Mesa layer stores its own copy."""
    model = _pvt(mesa=MesaPolicy(exclude=(r'^patch_embed1\.', r'softmax$')))
    plain = _pvt(mesa=None)
    plain.load_state_dict(model.state_dict(), strict=False)
    x = _x_for('pvt')
    outs, _ = fwd_bwd(model, x)
    outs_ref, _ = fwd_bwd(plain, x)
    assert all(torch.equal(o, o_ref) for o, o_ref in zip(outs, outs_ref))
    assert bool(model.block1[0].attn.av_matmul.quantizer_a.initialized.all())


# ------------------------------------------ linears over (L, B, C) transposes
def _linear_op(op: str, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    from mesa_seg.mesa import ops
    from mesa_seg.mesa.shared_ops import gelu_linear, in_projection
    q = ActivationQuantizer()
    if op == 'linear':
        return ops.linear(x, w, b, q)
    if op == 'gelu_linear':
        return gelu_linear(x, 'none', w, b, q)
    # q, k and v from one input, as mmcv's attention calls them
    return sum(in_projection([x] * 3, [w] * 3, [b] * 3, [q] * 3))


def _reference_op(op: str, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    y = F.linear(F.gelu(x) if op == 'gelu_linear' else x, w, b)
    return sum([y] * 3) if op == 'in_projection' else y


@pytest.mark.parametrize('amp', [False, True])
@pytest.mark.parametrize('op', ['linear', 'gelu_linear', 'in_projection'])
def test_linears_over_transposed_inputs_run_one_gemm_and_match_torch(op, amp):
    # mmcv's MultiheadAttention feeds (L, B, C) transposes and gets their
    # gradients back as such. A weight copy made inside a Function (autocast's
    # bf16 cast) does not require grad, and torch's matmul then runs a batched
    # matmul over the weight expanded per sample (35-70x slower in bf16 on CPU
    # than the one GEMM of torch's own forward, and other bits).
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.add(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    x = torch.randn(2, 9, 16).transpose(0, 1)
    # a slice of a packed weight, as MesaMultiheadAttention passes in_proj_weight:
    # it requires grad without being a leaf (autocast caches no copy of it)
    packed_w, packed_b = torch.randn(48, 16), torch.randn(48)
    gy = torch.randn(2, 9, 24).transpose(0, 1)
    outputs, grads = [], []
    for fn in (_linear_op, _reference_op):
        xi = x.clone().requires_grad_()
        mode = Ops()
        with mode:
            with torch.autocast('cpu', dtype=torch.bfloat16, enabled=amp):
                w = packed_w.clone().requires_grad_()[:24]
                b = packed_b.clone().requires_grad_()[:24]
                y = fn(op, xi, w, b)
            y.backward(gy.to(y.dtype))
        outputs.append(y.detach())
        grads.append(xi.grad)
        if fn is _linear_op:
            assert 'bmm' not in mode.names and 'mm' in mode.names, sorted(mode.names)
    assert outputs[0].dtype == (torch.bfloat16 if amp else torch.float32)
    assert torch.equal(outputs[0], outputs[1])  # Mesa's forward is torch's
    assert grads[0].dtype == x.dtype
    if op == 'gelu_linear' or amp:  # GELU's backward reads the 8-bit copy of x
        assert_grad_close(grads[1], grads[0], f'{op} amp={amp}')
    else:  # the input gradient does not read the stored input: same up to rounding
        torch.testing.assert_close(grads[0], grads[1])
