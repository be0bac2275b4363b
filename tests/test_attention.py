"""mesa_seg.mesa.attention: MesaMultiheadAttention vs torch.nn.MultiheadAttention.

Forward outputs (and returned attention weights) must be bit-identical to torch's
in training mode, on both of torch's paths (need_weights=True: explicit
bmm/softmax/bmm; need_weights=False: scaled_dot_product_attention), with the
same dropout masks under the same seed; gradients close to FP32; everything
saved for backward in 8 bits (or 1 bit, or per-row statistics).
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mesa_seg.mesa import ActivationQuantizer, QuantizerConfig, audit_saved_tensors
from mesa_seg.mesa.attention import MesaMultiheadAttention, _dropout, _dropout_backward
from mesa_utils import assert_grad_close, eager_by_default, saved_bytes  # noqa: F401

QUANT_KEYS = set(ActivationQuantizer().state_dict())
# Per-tensor bound: small tensors (bias_k, a 32-vector summing few terms) see
# more relative error than the 3 % of mesa_utils; all gradients together are
# held to mesa_utils' bounds (see _assert_grads_close).
TENSOR_REL_L2 = 0.05


def _assert_grads_close(grads_ref, grads, what=''):
    assert grads.keys() == grads_ref.keys()
    for key in grads:
        assert_grad_close(grads_ref[key], grads[key], f'{what}{key}', rel_l2=TENSOR_REL_L2)
    assert_grad_close(torch.cat([g.flatten() for g in grads_ref.values()]),
                      torch.cat([g.flatten() for g in grads.values()]), f'{what}all')

CONFIGS = {
    'plain': dict(embed_dim=32, num_heads=4),
    'batch_first': dict(embed_dim=32, num_heads=4, batch_first=True),
    'dropout': dict(embed_dim=32, num_heads=2, dropout=0.3),
    'kdim_vdim': dict(embed_dim=32, num_heads=2, kdim=16, vdim=24),
    'bias_kv_zero_attn': dict(embed_dim=32, num_heads=4, add_bias_kv=True, add_zero_attn=True),
    'no_bias': dict(embed_dim=32, num_heads=4, bias=False),
}


def _pair(seed=0, **kwargs):
    """torch's module and its Mesa twin (same parameters, separate copies)."""
    torch.manual_seed(seed)
    ref = nn.MultiheadAttention(**kwargs).train()
    with torch.random.fork_rng():
        mesa = MesaMultiheadAttention.from_float(copy.deepcopy(ref)).train()
    return ref, mesa


def _inputs(cfg, style, n=12, m=7, batch=2):
    """(leaves, query, key, value) in one of the ways models call attention."""
    seq = (lambda t: t) if cfg.get('batch_first') else (lambda t: t.transpose(0, 1))
    e = cfg['embed_dim']
    x = torch.randn(batch, n, e, requires_grad=True)
    if 'kdim' in cfg:
        k = torch.randn(batch, m, cfg['kdim'], requires_grad=True)
        v = torch.randn(batch, m, cfg['vdim'], requires_grad=True)
        return [x, k, v], seq(x), seq(k), seq(v)
    if style == 'same':  # one tensor for q, k and v
        xs = seq(x)
        return [x], xs, xs, xs
    if style == 'views':  # three views of one tensor (mmcv's MultiheadAttention)
        return [x], seq(x), seq(x), seq(x)
    if style == 'kv':  # key is value, another tensor (SegFormer's reduced x_kv)
        kv = seq(torch.randn(batch, m, e, requires_grad=True))
        return [x, kv], seq(x), kv, kv
    if style == 'unbatched':
        xu = torch.randn(n, e, requires_grad=True)
        return [xu], xu, xu, xu
    raise ValueError(style)


def _run(module, query, key, value, leaves, seed=3, **kwargs):
    """Forward under a fixed seed (dropout), backward of a random projection of
    the output and of the returned weights; returns outputs and gradients."""
    torch.manual_seed(seed)
    out, weights = module(query, key, value, **kwargs)
    gen = torch.Generator().manual_seed(1)
    loss = (out * torch.randn(out.shape, generator=gen)).sum()
    if weights is not None:
        loss = loss + (weights * torch.randn(weights.shape, generator=gen)).sum()
    params = [p for p in module.parameters()]
    grads = torch.autograd.grad(loss, params + leaves)
    names = [n for n, _ in module.named_parameters()] + [f'input{i}' for i in range(len(leaves))]
    return out.detach(), None if weights is None else weights.detach(), dict(zip(names, grads))


CASES = [(name, style) for name in CONFIGS
         for style in (('same', 'views', 'kv', 'unbatched') if name == 'plain' else ('views',))]


@pytest.mark.parametrize('need_weights', [True, False])
@pytest.mark.parametrize('name,style', CASES)
def test_forward_bit_identical_gradients_close(name, style, need_weights):
    cfg = CONFIGS[name]
    ref, mesa = _pair(**cfg)
    leaves, q, k, v = _inputs(cfg, style)
    out_ref, w_ref, g_ref = _run(ref, q, k, v, leaves, need_weights=need_weights)
    out, w, g = _run(mesa, q, k, v, leaves, need_weights=need_weights)
    assert torch.equal(out, out_ref)
    assert (w is None and w_ref is None) or torch.equal(w, w_ref)
    _assert_grads_close(g_ref, g)


@pytest.mark.parametrize('need_weights', [True, False])
def test_masks_and_per_head_weights(need_weights):
    cfg = CONFIGS['plain']
    for mask_kind in ('float', 'bool', 'padding', 'float+padding'):
        ref, mesa = _pair(**cfg)
        leaves, q, k, v = _inputs(cfg, 'same')
        n, batch = q.shape[0], q.shape[1]
        kwargs = dict(need_weights=need_weights, average_attn_weights=False)
        if 'float' in mask_kind:
            kwargs['attn_mask'] = torch.randn(n, n)
        if mask_kind == 'bool':
            kwargs['attn_mask'] = torch.rand(n, n) < 0.3
            kwargs['attn_mask'].fill_diagonal_(False)
        if 'padding' in mask_kind:
            pad = torch.zeros(batch, n, dtype=torch.bool)
            pad[:, -3:] = True
            kwargs['key_padding_mask'] = pad if mask_kind == 'padding' else pad.float() * -1e4
        out_ref, w_ref, g_ref = _run(ref, q, k, v, leaves, **kwargs)
        out, w, g = _run(mesa, q, k, v, leaves, **kwargs)
        assert torch.equal(out, out_ref), mask_kind
        assert (w is None and w_ref is None) or torch.equal(w, w_ref), mask_kind
        _assert_grads_close(g_ref, g, f'{mask_kind}: ')


@pytest.mark.parametrize('need_weights', [True, False])
def test_mask_that_needs_a_gradient(need_weights):
    """An additive bias with a gradient (e.g. a learned relative position bias)
    gets it; torch's SDPA takes its math backend here, and so does Mesa."""
    cfg = CONFIGS['plain']
    ref, mesa = _pair(**cfg)
    leaves, q, k, v = _inputs(cfg, 'same')
    bias = torch.randn(q.shape[0], q.shape[0], requires_grad=True)
    out_ref, _, g_ref = _run(ref, q, k, v, leaves + [bias], need_weights=need_weights,
                             attn_mask=bias)
    out, _, g = _run(mesa, q, k, v, leaves + [bias], need_weights=need_weights,
                     attn_mask=bias)
    assert torch.equal(out, out_ref)
    _assert_grads_close(g_ref, g)


@pytest.mark.parametrize('need_weights', [True, False])
def test_causal(need_weights):
    cfg = CONFIGS['plain']
    ref, mesa = _pair(**cfg)
    leaves, q, k, v = _inputs(cfg, 'same')
    mask = nn.Transformer.generate_square_subsequent_mask(q.shape[0])
    out_ref, _, _ = _run(ref, q, k, v, leaves, need_weights=need_weights, attn_mask=mask,
                         is_causal=True)
    out, _, _ = _run(mesa, q, k, v, leaves, need_weights=need_weights, attn_mask=mask,
                     is_causal=True)
    assert torch.equal(out, out_ref)


def test_dropout_same_mask_as_torch():
    """Same seed, same kept elements, same output and gradient as F.dropout."""
    x = torch.rand(3, 17, 9, requires_grad=True)
    torch.manual_seed(5)
    y_ref = F.dropout(x, 0.25, training=True)
    torch.manual_seed(5)
    y, keep = _dropout(x.detach(), 0.25)
    assert torch.equal(y, y_ref)
    assert torch.equal(keep, y_ref != 0)
    g = torch.randn_like(x)
    (g_ref,) = torch.autograd.grad(y_ref, x, g)
    assert torch.equal(_dropout_backward(g, keep, 0.25), g_ref)


@pytest.mark.parametrize('need_weights', [True, False])
def test_attention_dropout_draws_like_torch(need_weights):
    """With attention dropout, several steps in a row: the RNG is consumed as
    torch consumes it, so outputs stay identical step after step."""
    ref, mesa = _pair(embed_dim=16, num_heads=2, dropout=0.5)
    x = torch.randn(9, 2, 16, requires_grad=True)
    torch.manual_seed(11)
    outs_ref = [ref(x, x, x, need_weights=need_weights)[0] for _ in range(3)]
    torch.manual_seed(11)
    outs = [mesa(x, x, x, need_weights=need_weights)[0] for _ in range(3)]
    for o, o_ref in zip(outs, outs_ref):
        assert torch.equal(o, o_ref)
    assert not torch.equal(outs[0], outs[1])


@pytest.mark.parametrize('need_weights', [True, False])
@pytest.mark.parametrize('dropout', [0.0, 0.2])
def test_autocast_bf16_cpu(need_weights, dropout):
    ref, mesa = _pair(embed_dim=32, num_heads=4, dropout=dropout)
    x = torch.randn(10, 2, 32, requires_grad=True)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out_ref, _, g_ref = _run(ref, x, x, x, [x], need_weights=need_weights)
        out, _, g = _run(mesa, x, x, x, [x], need_weights=need_weights)
    assert out.dtype == torch.bfloat16 and torch.equal(out, out_ref)
    for key in g:  # bf16 rounding of the reference itself dominates here
        assert_grad_close(g_ref[key], g[key], key, rel_l2=0.05, cosine=0.998)


@pytest.mark.parametrize('need_weights', [True, False])
def test_bf16_parameters(need_weights):
    ref, mesa = _pair(embed_dim=32, num_heads=4, dropout=0.1)
    ref, mesa = ref.bfloat16(), mesa.bfloat16()
    x = torch.randn(10, 2, 32, dtype=torch.bfloat16, requires_grad=True)
    out_ref, _, _ = _run(ref, x, x, x, [x], need_weights=need_weights)
    out, _, _ = _run(mesa, x, x, x, [x], need_weights=need_weights)
    assert torch.equal(out, out_ref)


def test_state_dict_keys_and_round_trip():
    for cfg in CONFIGS.values():
        ref, mesa = _pair(**cfg)
        ref_keys, keys = set(ref.state_dict()), set(mesa.state_dict())
        assert ref_keys <= keys
        extra = keys - ref_keys
        assert extra and all(k.split('.', 1)[0] in MesaMultiheadAttention._quantized
                             and k.rsplit('.', 1)[1] in QUANT_KEYS for k in extra)
        # torch -> Mesa strict (the quantizer ranges start on the first batch) ...
        mesa.load_state_dict(ref.state_dict(), strict=True)
        # ... and back, once the quantizer state is dropped.
        ref.load_state_dict({k: v for k, v in mesa.state_dict().items() if k in ref_keys})
        plain = mesa.to_float()
        assert type(plain) is nn.MultiheadAttention and set(plain.state_dict()) == ref_keys
    # Constructed directly, with torch's arguments.
    module = MesaMultiheadAttention(32, 4, dropout=0.1, batch_first=True,
                                    mesa_config=QuantizerConfig(groups=2))
    assert module.quantizer_in_q.groups == 2 and module.quantizer_attn.groups == 4
    assert set(nn.MultiheadAttention(32, 4).state_dict()) < set(module.state_dict())


def test_quantizer_layout():
    mesa = MesaMultiheadAttention.from_float(nn.MultiheadAttention(32, 4, kdim=16, vdim=8),
                                             QuantizerConfig(groups=8))
    for name in ('quantizer_in_q', 'quantizer_in_k', 'quantizer_in_v'):
        assert getattr(mesa, name).groups == 8 and getattr(mesa, name).dim == -1
    for name in ('quantizer_q', 'quantizer_k', 'quantizer_v', 'quantizer_attn', 'quantizer_out'):
        assert getattr(mesa, name).groups == 4 and getattr(mesa, name).dim == 1
    with pytest.raises(ValueError, match='groups=3 does not divide embed_dim=32'):
        MesaMultiheadAttention.from_float(nn.MultiheadAttention(32, 4), QuantizerConfig(groups=3))
    with pytest.raises(ValueError, match='does not divide vdim=12'):
        MesaMultiheadAttention(32, 4, kdim=16, vdim=12, mesa_config=QuantizerConfig(groups=8))


def test_plain_torch_forward_when_not_training():
    ref, mesa = _pair(embed_dim=32, num_heads=4, batch_first=True)
    x = torch.randn(2, 10, 32)
    before = copy.deepcopy(mesa.state_dict())
    ref.eval(), mesa.eval()
    with torch.no_grad():  # torch's inference fast path
        assert torch.equal(mesa(x, x, x)[0], ref(x, x, x)[0])
    assert torch.equal(mesa(x, x, x)[0], ref(x, x, x)[0])
    ref.train(), mesa.train()
    with torch.no_grad():
        assert torch.equal(mesa(x, x, x)[0], ref(x, x, x)[0])
    for key, value in mesa.state_dict().items():  # running ranges untouched
        assert torch.equal(value, before[key]), key
    # Disabled: the same saved tensors as torch.
    mesa.mesa_enabled = False
    xg = x.clone().requires_grad_()
    _, n_ref = saved_bytes(lambda: ref(xg, xg, xg)[0])
    _, n = saved_bytes(lambda: mesa(xg, xg, xg)[0])
    assert n == n_ref


def _count_packs(mesa):
    counts = {}
    for name in MesaMultiheadAttention._quantized:
        quantizer = getattr(mesa, name)
        pack = quantizer.pack

        def counting(x, _name=name, _pack=pack):
            counts[_name] = counts.get(_name, 0) + 1
            return _pack(x)
        quantizer.pack = counting
    return counts


@pytest.mark.parametrize('style,expected', [
    ('same', {'quantizer_in_q': 1}),
    ('views', {'quantizer_in_q': 1}),
    ('kv', {'quantizer_in_q': 1, 'quantizer_in_k': 1}),
])
@pytest.mark.parametrize('need_weights', [True, False])
def test_shared_inputs_quantized_once(style, expected, need_weights):
    cfg = CONFIGS['plain']
    _, mesa = _pair(**cfg)
    counts = _count_packs(mesa)
    leaves, q, k, v = _inputs(cfg, style)
    mesa(q, k, v, need_weights=need_weights)[0].sum().backward()
    core = ({'quantizer_q': 1, 'quantizer_k': 1, 'quantizer_v': 1, 'quantizer_attn': 1,
             'quantizer_out': 1} if need_weights else
            {'quantizer_q': 1, 'quantizer_k': 1, 'quantizer_v': 1, 'quantizer_out': 1})
    assert counts == {**expected, **core}
    # Three distinct inputs: three quantizers.
    counts.clear()
    x, y, z = (torch.randn(5, 2, 32, requires_grad=True) for _ in range(3))
    mesa(x, y, z, need_weights=need_weights)[0].sum().backward()
    assert {k: n for k, n in counts.items() if k.startswith('quantizer_in')} == {
        'quantizer_in_q': 1, 'quantizer_in_k': 1, 'quantizer_in_v': 1}


class _Wrap(nn.Module):
    """Calls attention as mmcv does (batch-first input, three transposes)."""

    def __init__(self, attn, need_weights):
        super().__init__()
        self.attn, self.need_weights = attn, need_weights

    def forward(self, x, kv):
        q, k, v = x.transpose(0, 1), kv.transpose(0, 1), kv.transpose(0, 1)
        return self.attn(q, k, v, need_weights=self.need_weights)[0]


@pytest.mark.parametrize('dropout', [0.0, 0.1])
@pytest.mark.parametrize('need_weights', [True, False])
def test_everything_saved_in_8_bits(need_weights, dropout):
    n, m, e = 64, 24, 32
    ref, mesa = _pair(embed_dim=e, num_heads=2, dropout=dropout)
    x = torch.randn(2, n, e, requires_grad=True)
    kv = torch.randn(2, m, e, requires_grad=True)
    records = audit_saved_tensors(_Wrap(mesa, need_weights), x, kv)
    ref_records = audit_saved_tensors(_Wrap(ref, need_weights), x, kv)
    assert records and all(r.compressed for r in records)
    assert not any(r.compressed for r in ref_records)
    raw = [r for r in records if r.dtype not in ('uint8', 'bool')]
    # Beside the codes: per-group ranges and (fused path) the per-row log-sum-exp.
    assert all(len(r.shape) == 1 or r.shape == (2, 2, n) for r in raw), raw
    biggest = max(r.nbytes for r in records)
    scores = 2 * 2 * n * m  # uint8 probabilities (B, heads, N, M)
    if need_weights or dropout:  # stored probabilities (explicit / math path)
        assert biggest == scores
    else:  # fused: no N x M tensor at all
        assert biggest < scores
    assert sum(r.nbytes for r in records) < 0.3 * sum(r.nbytes for r in ref_records)


def test_fused_path_is_torch_sdpa():
    """need_weights=False: the same kernel and output as torch's SDPA call."""
    from mesa_seg.mesa.attention import _SDP_FLASH, fused_attention
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, n, 8, requires_grad=True) for n in (20, 7, 7))
    w, b = torch.randn(24, 24, requires_grad=True), torch.randn(24, requires_grad=True)
    quants = [ActivationQuantizer(QuantizerConfig(groups=3), 1) for _ in range(4)]
    out = fused_attention(q, k, v, None, w, b, _SDP_FLASH, 0.0, False, 20, 2, quants)
    ref = F.scaled_dot_product_attention(q, k, v)
    ref = F.linear(ref.permute(2, 0, 1, 3).reshape(40, 24), w, b)
    assert torch.equal(out, ref)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v, w, b), g)
    grads_ref = torch.autograd.grad(ref, (q, k, v, w, b), g)
    for name, got, want in zip('qkvwb', grads, grads_ref):
        assert_grad_close(want, got, name)


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
@pytest.mark.parametrize('dtype', [torch.float32, torch.float16])
@pytest.mark.parametrize('need_weights', [True, False])
def test_cuda(dtype, need_weights):
    """CUDA: efficient kernel (fp32), flash (fp16), native_dropout masks."""
    ref, mesa = _pair(embed_dim=64, num_heads=2, dropout=0.1)
    ref, mesa = ref.cuda().to(dtype), mesa.cuda().to(dtype)
    x = torch.randn(2, 40, 64, device='cuda', dtype=dtype, requires_grad=True)
    out_ref, _, g_ref = _run(ref, x, x, x, [x], need_weights=need_weights)
    out, _, g = _run(mesa, x, x, x, [x], need_weights=need_weights)
    assert torch.equal(out, out_ref)
    for key in g:
        assert_grad_close(g_ref[key].float(), g[key].float(), key, rel_l2=0.05, cosine=0.998)



def test_mesafy_converts_multihead_attention():
    from mesa_seg.mesa import LAYER_TYPES, MesaPolicy, mesafy_

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.num_heads = 4  # ignored by the attention: it has its own
            self.attn = nn.MultiheadAttention(32, 2, batch_first=True)
            self.proj = nn.Linear(32, 32)

        def forward(self, x):
            return self.proj(self.attn(x, x, x, need_weights=False)[0])

    assert LAYER_TYPES['MultiheadAttention'] == (nn.MultiheadAttention, MesaMultiheadAttention)
    torch.manual_seed(0)
    ref = Block()
    model = mesafy_(copy.deepcopy(ref))
    assert type(model.attn) is MesaMultiheadAttention
    assert model.attn.quantizer_in_q.groups == 2 and model.attn.quantizer_q.groups == 2
    assert model.proj.quantizer.groups == 4
    channels = mesafy_(copy.deepcopy(ref), dict(groups='channels'))
    assert channels.attn.quantizer_in_q.groups == 32 and channels.attn.quantizer_q.groups == 2
    kept = mesafy_(copy.deepcopy(ref), MesaPolicy(layers=('Linear', )))
    assert type(kept.attn) is nn.MultiheadAttention
    x = torch.randn(2, 6, 32, requires_grad=True)
    assert torch.equal(model(x), ref(x))
    assert type(model.attn.to_float()) is nn.MultiheadAttention
