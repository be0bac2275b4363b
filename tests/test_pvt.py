"""PVT v1 / PVTv2 backbones: timm equivalence, official keys, checkpoints, Mesa,
activation checkpointing."""
import re

# First: importing backbone_utils registers mesa-seg before mmseg is imported.
from backbone_utils import checkpointing_saved_bytes, flat, fwd_bwd, saved_bytes
import pytest
import timm
import torch
import torch.nn.functional as F
from mmseg.registry import MODELS
from torch import nn
from timm.models.pvt_v2 import checkpoint_filter_fn

import mesa_seg.models.backbones.pvt_base as pvt_base
import mesa_seg.models.backbones.pvt_v2 as pvt_v2_module
from mesa_seg.models.backbones import PVT, PVTv2, MesaPVT, MesaPVTv2
from mesa_seg.mesa import MatMul
from mesa_seg.models.checkpoint import (pvt_classification_to_backbone,
                                        timm_pvt_v2_to_official)
# Eager Mesa kernels (autouse): the compiled ones are tested by the core's tests.
from mesa_utils import eager_by_default  # noqa: F401

# A two-block PVTv2 small enough for CPU tests, run through timm as well.
SMALL_V2 = dict(
    embed_dims=[32, 64, 160, 256],
    depths=[1, 1, 2, 1],
    num_heads=[1, 2, 5, 8],
    mlp_ratios=[8, 8, 4, 4],
    sr_ratios=[8, 4, 2, 1])


def _timm_pvt_v2(name, **kwargs):
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, drop_path_rate=0.,
                             **kwargs)


# --------------------------------------------------------------------------
# PVTv2 against timm (an independent implementation)
# --------------------------------------------------------------------------
@pytest.mark.parametrize('timm_name, arch, hw', [
    ('pvt_v2_b0', 'b0', (64, 64)),
    ('pvt_v2_b0', 'b0', (70, 101)),
    ('pvt_v2_b2_li', dict(SMALL_V2, embed_dims=[64, 128, 320, 512],
                          linear=True), (64, 96)),
])
def test_pvt_v2_matches_timm(timm_name, arch, hw):
    timm_kwargs = {} if isinstance(arch, str) else dict(
        depths=arch['depths'])
    ref = _timm_pvt_v2(timm_name, **timm_kwargs)
    state_dict = timm_pvt_v2_to_official(ref.state_dict())
    state_dict = {k: v for k, v in state_dict.items() if not k.startswith('head.')}
    model = PVTv2(arch=arch, drop_path_rate=0.)
    model.load_state_dict(state_dict, strict=True)

    x = torch.randn(2, 3, *hw)
    outs = model.eval()(x)
    ref_outs = ref.eval().forward_intermediates(x, intermediates_only=True)
    assert len(outs) == len(ref_outs) == 4
    for out, ref_out in zip(outs, ref_outs):
        assert out.shape == ref_out.shape
        # timm uses fused scaled_dot_product_attention: fp32 rounding only.
        torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=2e-5)


def test_pvt_v2_gradients_match_timm():
    ref = _timm_pvt_v2('pvt_v2_b0')
    model = PVTv2(arch='b0', drop_path_rate=0.)
    model.load_state_dict(
        {k: v for k, v in timm_pvt_v2_to_official(ref.state_dict()).items()
         if not k.startswith('head.')})
    x = torch.randn(1, 3, 64, 64)
    _, grads = fwd_bwd(model, x)

    class Features(torch.nn.Module):  # timm model with our output signature

        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x):
            return self.net.forward_intermediates(x, intermediates_only=True)

    _, ref_grads = fwd_bwd(Features(ref), x)
    ref_grads = {k[len('net.'):] if k != 'input' else k: v
                 for k, v in ref_grads.items()}
    ref_grads = timm_pvt_v2_to_official(
        {k: v for k, v in ref_grads.items() if k != 'input'}) | {
            'input': ref_grads['input']}
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        # Summed over many positions: compare relative L2 error, not elements.
        error = (grad - ref_grads[name]).norm() / ref_grads[name].norm()
        assert error < 1e-5, (name, error)


def test_timm_conversion_inverts_timms_own_filter():
    """timm's checkpoint_filter_fn maps official -> timm; ours must undo it."""
    official = PVTv2(arch='b0').state_dict()
    official['head.weight'] = torch.randn(1000, 256)
    official['head.bias'] = torch.randn(1000)
    timm_layout = checkpoint_filter_fn(dict(official), None)
    assert set(timm_layout) == set(_timm_pvt_v2('pvt_v2_b0').state_dict())
    back = timm_pvt_v2_to_official(timm_layout)
    assert list(back) == list(official)
    assert all(back[k] is official[k] for k in official)
    with pytest.raises(KeyError, match='pos_embed'):
        timm_pvt_v2_to_official({'stages.0.norm.weight': 0, 'pos_embed': 0})


def test_linear_attention_pool_saves_no_activation():
    from mesa_seg.models.backbones.pvt_v2 import AdaptiveAvgPool2d
    tokens = torch.randn(2, 13 * 17, 8, requires_grad=True)
    x = tokens.transpose(1, 2).reshape(2, 8, 13, 17)  # as in the attention
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(
            lambda t: saved.append(t) or t, lambda t: t):
        out = AdaptiveAvgPool2d(7)(x)
    assert saved == []
    ref = F.adaptive_avg_pool2d(x, 7)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    grad = torch.randn_like(ref)
    (got, ) = torch.autograd.grad(out, tokens, grad)
    (expected, ) = torch.autograd.grad(ref, tokens, grad)
    # torch takes its channels-last kernel here: summation order differs.
    torch.testing.assert_close(got, expected)


# --------------------------------------------------------------------------
# Official key names (whai362/PVT, classification/pvt.py and pvt_v2.py)
# --------------------------------------------------------------------------
def _official_keys(depths, v2):
    """Key set of the released ImageNet checkpoints, written from the spec."""
    wb = ('weight', 'bias')
    keys = {f'head.{p}' for p in wb}
    keys |= {'cls_token', 'norm.weight', 'norm.bias'} if not v2 else set()
    for i, depth in enumerate(depths, start=1):
        keys |= {f'patch_embed{i}.{m}.{p}' for m in ('proj', 'norm') for p in wb}
        keys |= {f'norm{i}.{p}' for p in wb} if v2 else {f'pos_embed{i}'}
        block = ['norm1', 'attn.q', 'attn.kv', 'attn.proj', 'norm2', 'mlp.fc1',
                 'mlp.fc2'] + (['mlp.dwconv.dwconv'] if v2 else [])
        if i < 4:  # sr_ratio 1 in the last stage: no reduction conv/norm
            block += ['attn.sr', 'attn.norm']
        keys |= {f'block{i}.{j}.{m}.{p}'
                 for j in range(depth) for m in block for p in wb}
    return keys


@pytest.mark.parametrize('cls, arch, v2', [(PVT, 'tiny', False),
                                           (PVT, 'medium', False),
                                           (PVTv2, 'b0', True),
                                           (PVTv2, 'b5', True)])
def test_official_key_names(cls, arch, v2):
    model = cls(arch=arch)
    classification_only = {'head.weight', 'head.bias'} | (
        set() if v2 else {'cls_token', 'norm.weight', 'norm.bias'})
    expected = _official_keys(cls.arch_zoo[arch]['depths'], v2)
    assert set(model.state_dict()) == expected - classification_only


def test_attention_and_blocks_expose_num_heads():
    for model in (PVT(arch='tiny'), PVTv2(arch='b2_li')):
        for i, heads in enumerate(model.arch['num_heads'], start=1):
            for block in getattr(model, f'block{i}'):
                assert block.num_heads == block.attn.num_heads == heads
                assert {'qk_matmul', 'softmax', 'av_matmul'} <= dict(
                    block.attn.named_children()).keys()
        assert not isinstance(getattr(model, 'num_heads', None), int)


# --------------------------------------------------------------------------
# PVT v1 shapes, out_indices, positional embeddings
# --------------------------------------------------------------------------
@pytest.mark.parametrize('hw', [(64, 64), (97, 130)])
def test_pvt_v1_output_shapes(hw):
    model = PVT(arch='tiny')
    outs = model(torch.randn(2, 3, *hw))
    dims = [64, 128, 320, 512]
    h, w = hw[0] // 4, hw[1] // 4
    for i, out in enumerate(outs):
        assert out.shape == (2, dims[i], h, w)
        h, w = h // 2, w // 2


@pytest.mark.parametrize('cls', [PVT, PVTv2])
def test_out_indices(cls):
    x = torch.randn(1, 3, 64, 64)
    full = cls(out_indices=(0, 1, 2, 3)).eval()
    for indices, expect in [((1, 3), [1, 3]), (2, [2]), ((-1, ), [3])]:
        part = cls(out_indices=indices).eval()
        part.load_state_dict(full.state_dict())
        with torch.no_grad():
            got, ref = part(x), full(x)
        assert len(got) == len(expect)
        for g, i in zip(got, expect):
            torch.testing.assert_close(g, ref[i], rtol=0, atol=0)
    with pytest.raises(ValueError, match='out_indices'):
        cls(out_indices=(4, ))
    with pytest.raises(ValueError, match='Unknown arch'):
        cls(arch='huge')
    with pytest.raises(ValueError, match='one entry per stage'):
        cls(arch=dict(SMALL_V2, depths=[1, 1, 1]))


def test_pvt_v1_pos_embed_interpolation():
    """Stage-1 tokens get the 56x56 table bilinearly resized to their grid."""
    model = PVT(arch='tiny', drop_path_rate=0.).eval()
    model.init_weights()
    assert model.pos_embed1.shape == (1, 56 * 56, 64)
    assert model.pos_embed4.shape == (1, 7 * 7, 512)

    captured = {}
    model.pos_drop1.register_forward_hook(
        lambda m, inp, out: captured.__setitem__('tokens', inp[0]))
    for hw in [(224, 224), (96, 160)]:
        x = torch.randn(1, 3, *hw)
        with torch.no_grad():
            model(x)
            tokens, _ = model.patch_embed1(x)
        # Written as the authors' code: (1, N, C) -> (1, H, W, C) -> NCHW.
        table = model.pos_embed1.detach().reshape(1, 56, 56, 64).permute(0, 3, 1, 2)
        grid = (hw[0] // 4, hw[1] // 4)
        if grid != (56, 56):
            table = F.interpolate(table, size=grid, mode='bilinear',
                                  align_corners=False)
        expected = tokens + table.flatten(2).transpose(1, 2)
        torch.testing.assert_close(captured['tokens'], expected, rtol=0, atol=0)


# --------------------------------------------------------------------------
# Pretrained loading through init_cfg
# --------------------------------------------------------------------------
@pytest.fixture
def logs(monkeypatch):
    messages = []
    for module in (pvt_base, pvt_v2_module):
        monkeypatch.setattr(module, 'print_log',
                            lambda msg, *a, **k: messages.append(msg))
    return messages


def _official_v1_checkpoint(model):
    """What the released classification pvt_*.pth holds for ``model``'s weights."""
    state_dict = dict(model.state_dict())
    cls_pos = torch.randn(1, 1, 512)
    state_dict['pos_embed4'] = torch.cat([cls_pos, state_dict['pos_embed4']], 1)
    state_dict['cls_token'] = torch.randn(1, 1, 512)
    state_dict['norm.weight'] = torch.randn(512)
    state_dict['norm.bias'] = torch.randn(512)
    state_dict['head.weight'] = torch.randn(1000, 512)
    state_dict['head.bias'] = torch.randn(1000)
    return state_dict


def test_pvt_v1_pretrained_official_checkpoint(tmp_path, logs):
    torch.manual_seed(0)
    src = PVT(arch='tiny')
    src.init_weights()
    path = tmp_path / 'pvt_tiny.pth'
    torch.save(_official_v1_checkpoint(src), path)

    model = MODELS.build(
        dict(type='PVT', arch='tiny',
             init_cfg=dict(type='Pretrained', checkpoint=str(path))))
    model.init_weights()
    for k, v in src.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    dropped = next(m for m in logs if 'classification-only' in m)
    for key in ('cls_token', 'head.weight', 'norm.weight', 'pos_embed4[:, 0]'):
        assert key in dropped
    assert not any('missing' in m or 'unexpected' in m for m in logs)


def test_pvt_v1_pretrained_other_grid(tmp_path):
    """A 224-px checkpoint loads into a model storing embeddings for 128 px."""
    src = PVT(arch='tiny')
    src.init_weights()
    path = tmp_path / 'pvt_tiny.pth'
    torch.save(dict(model=_official_v1_checkpoint(src)), path)
    model = PVT(arch='tiny', pretrain_img_size=128,
                init_cfg=dict(type='Pretrained', checkpoint=str(path)))
    model.init_weights()
    assert model.pos_embed1.shape == (1, 32 * 32, 64)
    x = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        for a, b in zip(model.eval()(x), src.eval()(x)):
            torch.testing.assert_close(a, b)  # same resize, once vs per call


def test_pvt_v2_pretrained_timm_and_segmentor_checkpoints(tmp_path, logs):
    ref = _timm_pvt_v2('pvt_v2_b0')
    timm_path = tmp_path / 'timm_b0.pth'
    torch.save(ref.state_dict(), timm_path)
    model = PVTv2(arch='b0', drop_path_rate=0.,
                  init_cfg=dict(type='Pretrained', checkpoint=str(timm_path)))
    model.init_weights()
    assert any('head.weight' in m for m in logs)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        for a, b in zip(model.eval()(x),
                        ref.eval().forward_intermediates(x,
                                                         intermediates_only=True)):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=2e-5)

    # A whole mmseg segmentor checkpoint: only 'backbone.*' is taken.
    seg_path = tmp_path / 'fpn_pvtv2.pth'
    torch.save(dict(state_dict={
        **{f'backbone.{k}': v for k, v in model.state_dict().items()},
        'decode_head.conv_seg.weight': torch.randn(150, 128, 1, 1)}), seg_path)
    other = PVTv2(arch='b0',
                  init_cfg=dict(type='Pretrained', checkpoint=str(seg_path)))
    other.init_weights()
    for k, v in model.state_dict().items():
        assert torch.equal(other.state_dict()[k], v), k


def test_pretrained_missing_keys_are_reported(tmp_path, logs):
    src = PVTv2(arch='b0').state_dict()
    del src['norm4.weight']
    path = tmp_path / 'partial.pth'
    torch.save(src, path)
    PVTv2(arch='b0',
          init_cfg=dict(type='Pretrained', checkpoint=str(path))).init_weights()
    assert any('missing' in m and 'norm4.weight' in m for m in logs)


def test_classification_to_backbone_is_pure():
    state_dict = {'pos_embed3': torch.zeros(1, 196, 8),
                  'pos_embed4': torch.zeros(1, 50, 8), 'head.bias': torch.zeros(3)}
    out, dropped = pvt_classification_to_backbone(state_dict)
    assert out['pos_embed3'].shape[1] == 196 and out['pos_embed4'].shape[1] == 49
    assert dropped == ['pos_embed4[:, 0]', 'head.bias']
    assert state_dict['pos_embed4'].shape[1] == 50  # input untouched


# --------------------------------------------------------------------------
# Training options
# --------------------------------------------------------------------------
@pytest.mark.parametrize('cls', [PVT, PVTv2])
def test_frozen_stages(cls):
    model = cls(frozen_stages=1, drop_rate=0.1)
    model.train()
    for name, param in model.named_parameters():
        stage = int(re.match(r'\D+(\d+)', name)[1])
        assert param.requires_grad == (stage > 2), name
    assert not model.block2.training and model.block3.training
    outs = model(torch.randn(1, 3, 64, 64))
    sum(o.sum() for o in outs).backward()
    assert model.block1[0].attn.q.weight.grad is None
    assert model.block3[0].attn.q.weight.grad is not None
    with pytest.raises(ValueError, match='frozen_stages'):
        cls(frozen_stages=4)


def test_registry_builds_all():
    for cfg in (dict(type='PVT', arch='small'), dict(type='PVTv2', arch='b1'),
                dict(type='MesaPVT', mesa=None),
                dict(type='MesaPVTv2', mesa=None)):
        assert type(MODELS.build(cfg)).__name__ == cfg['type']


# --------------------------------------------------------------------------
# Mesa
# --------------------------------------------------------------------------
def _mesa_pair(cls, arch, **kwargs):
    torch.manual_seed(0)
    ref = cls(arch=arch, drop_path_rate=0., **kwargs)
    ref.init_weights()
    mesa_cls = {PVT: MesaPVT, PVTv2: MesaPVTv2}[cls]
    model = mesa_cls(arch=arch, drop_path_rate=0., mesa=dict(), **kwargs)
    model.load_state_dict(ref.state_dict(), strict=False)
    return ref, model


@pytest.mark.parametrize('cls, arch', [(PVT, 'tiny'), (PVTv2, 'b0'),
                                       (PVTv2, dict(SMALL_V2, linear=True))])
def test_mesa_exact_forward_close_gradients_less_memory(cls, arch):
    ref, model = _mesa_pair(cls, arch)
    x = torch.randn(1, 3, 64, 64)
    outs_ref, grads_ref = fwd_bwd(ref, x)
    outs, grads = fwd_bwd(model, x)
    for o, o_ref in zip(outs, outs_ref):  # the forward pass is exact
        torch.testing.assert_close(o, o_ref, rtol=0, atol=0)
    assert grads.keys() == grads_ref.keys()
    cosine = F.cosine_similarity(flat(grads), flat(grads_ref), dim=0)
    assert cosine >= 0.995
    ratio = saved_bytes(model, x) / saved_bytes(ref, x)
    assert ratio < 0.3, ratio


def test_mesa_keys_and_plain_checkpoint():
    ref, model = _mesa_pair(PVTv2, 'b0')
    ref_keys = set(ref.state_dict())
    assert ref_keys <= set(model.state_dict())
    assert {n for n, _ in model.named_parameters()} == {
        n for n, _ in ref.named_parameters()}
    # Mesa's extra entries are buffers only.
    assert set(model.state_dict()) - ref_keys <= {
        n for n, _ in model.named_buffers()}


def test_mesa_disabled_is_fp32():
    torch.manual_seed(0)
    ref = PVT(arch='tiny', drop_path_rate=0.)
    ref.init_weights()
    for mesa in (None, dict(enabled=False)):
        model = MesaPVT(arch='tiny', drop_path_rate=0., mesa=mesa)
        model.load_state_dict(ref.state_dict(), strict=False)
        x = torch.randn(1, 3, 64, 64)
        outs_ref, grads_ref = fwd_bwd(ref, x)
        outs, grads = fwd_bwd(model, x)
        for o, o_ref in zip(outs, outs_ref):
            torch.testing.assert_close(o, o_ref, rtol=0, atol=0)
        for name, grad in grads.items():
            torch.testing.assert_close(grad, grads_ref[name], rtol=0, atol=0,
                                       msg=name)


def test_mesa_default_policy_and_overrides():
    from mesa_seg.mesa import MesaModule, MesaPolicy
    model = MesaPVTv2(arch=dict(SMALL_V2, linear=True))
    plain = {n for n, m in model.named_modules()
             if type(m) in (nn.Linear, nn.Conv2d, nn.LayerNorm, nn.GELU,
                            nn.Softmax, nn.ReLU, MatMul)}
    # Only the first patch embedding stays FP32 (the image conv + its norm).
    assert plain == {'patch_embed1.proj', 'patch_embed1.norm'}
    names = {n for n, m in model.named_modules() if isinstance(m, MesaModule)}
    assert {'block1.0.attn.qk_matmul', 'block1.0.attn.softmax',
            'block1.0.attn.av_matmul', 'block1.0.attn.act',
            'block1.0.mlp.relu', 'block1.0.mlp.dwconv.dwconv',
            'patch_embed2.proj', 'norm4'} <= names

    everything = MesaPVT(arch='tiny', mesa=dict(exclude=()))
    assert isinstance(everything.patch_embed1.proj, MesaModule)
    given = MesaPVT(arch='tiny', mesa=MesaPolicy(layers=('Linear', )))
    assert isinstance(given.patch_embed1.proj, nn.Conv2d) and not isinstance(
        given.patch_embed1.proj, MesaModule)
    assert isinstance(given.block1[0].attn.q, MesaModule)
    with pytest.raises(ValueError, match='unknown option'):
        MesaPVT(arch='tiny', mesa=dict(bitz=8))
    with pytest.raises(TypeError, match='mesa must be'):
        MesaPVT(arch='tiny', mesa='on')


# --------------------------------------------------------------------------
# Activation checkpointing (with_cp)
# --------------------------------------------------------------------------
# Two blocks in stage 1, one elsewhere; dropout, attention dropout and drop path
# all on, so the recomputation must replay the forward's random draws.
CP_ARCH = dict(
    embed_dims=[16, 32, 40, 64],
    depths=[2, 1, 1, 1],
    num_heads=[1, 2, 5, 8],
    mlp_ratios=[4, 4, 4, 4],
    sr_ratios=[8, 4, 2, 1])
CP_DROPS = dict(drop_rate=0.1, attn_drop_rate=0.1, drop_path_rate=0.3)
MESA_CLASSES = (MesaPVT, MesaPVTv2)


def _build_cp(cls, with_cp, arch=CP_ARCH):
    torch.manual_seed(0)
    mesa = dict(mesa=dict()) if cls in MESA_CLASSES else {}
    return cls(arch=arch, with_cp=with_cp, **CP_DROPS, **mesa)


@pytest.mark.parametrize('cls, arch', [
    (PVT, CP_ARCH), (PVTv2, CP_ARCH), (PVTv2, dict(CP_ARCH, linear=True)),
    (MesaPVT, CP_ARCH), (MesaPVTv2, CP_ARCH)])
def test_with_cp_exact_and_saves_memory(cls, arch):
    """True and 'selective' give the outputs and gradients of False, bit for
    bit, in training mode with every kind of dropout; under Mesa they also
    leave the running ranges and rounding steps as one step without
    checkpointing does (the recomputation replays the forward's quantization)."""
    x = torch.randn(1, 3, 64, 64)
    nbytes = checkpointing_saved_bytes(lambda mode: _build_cp(cls, mode, arch), x)
    assert nbytes[True] < nbytes['selective'], nbytes
    if cls in MESA_CLASSES:
        # Selective checkpointing keeps FP32 matmul outputs, which can outweigh
        # Mesa's 8-bit copies of everything: only True is sure to save here.
        assert nbytes[True] < nbytes[False], nbytes
    else:
        assert nbytes['selective'] < nbytes[False], nbytes


@pytest.mark.parametrize('mode', [True, 'selective'])
def test_with_cp_frozen_stages_and_eval(mode):
    """Blocks whose input needs no gradient (frozen stage 1) run plainly; eval
    and no_grad forwards are unaffected."""
    x = torch.randn(1, 3, 64, 64)
    torch.manual_seed(0)
    ref = PVTv2(arch=CP_ARCH, frozen_stages=0, **CP_DROPS)
    model = PVTv2(arch=CP_ARCH, frozen_stages=0, with_cp=mode, **CP_DROPS)
    model.load_state_dict(ref.state_dict())
    outs_ref, grads_ref = fwd_bwd(ref, x)
    outs, grads = fwd_bwd(model, x)
    assert 'block1.0.attn.q.weight' not in grads
    for o, o_ref in zip(outs, outs_ref):
        assert torch.equal(o, o_ref)
    for name, grad in grads.items():
        assert torch.equal(grad, grads_ref[name]), name
    with torch.no_grad():
        for o, o_ref in zip(model.eval()(x), ref.eval()(x)):
            assert torch.equal(o, o_ref)


def test_selective_policy_saves_matmul_and_conv_outputs():
    from torch.utils.checkpoint import CheckpointPolicy

    from mesa_seg.models.activation_checkpoint import \
        selective_checkpoint_policy
    aten = torch.ops.aten
    for op in (aten.mm.default, aten.addmm.default, aten.bmm.default,
               aten.baddbmm.default, aten.convolution.default):
        assert selective_checkpoint_policy(None, op) is CheckpointPolicy.MUST_SAVE
    for op in (aten.gelu.default, aten.native_layer_norm.default,
               aten._softmax.default, aten.native_dropout.default,
               aten.add.Tensor, aten.amin.default):
        assert selective_checkpoint_policy(
            None, op) is CheckpointPolicy.PREFER_RECOMPUTE


@pytest.mark.parametrize('cls', [PVT, PVTv2, MesaPVT, MesaPVTv2])
def test_with_cp_values(cls):
    model = MODELS.build(dict(type=cls.__name__, arch=CP_ARCH,
                              with_cp='selective'))
    assert model.with_cp == 'selective'
    assert all(block.with_cp == 'selective'
               for i in range(1, 5) for block in getattr(model, f'block{i}'))
    for bad in ('full', 'Selective', 1, None):
        with pytest.raises(ValueError, match="with_cp must be False, True"):
            cls(arch=CP_ARCH, with_cp=bad)


@pytest.mark.parametrize('suffix', ['.pth', '.safetensors'])
def test_timm2official_cli(tmp_path, monkeypatch, suffix):
    import importlib.util
    from pathlib import Path
    from safetensors.torch import save_file
    script = (Path(__file__).parents[1] / 'tools' / 'model_converters' /
              'pvt_v2_timm2official.py')
    spec = importlib.util.spec_from_file_location('pvt_v2_timm2official',
                                                  script)
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)

    ref = _timm_pvt_v2('pvt_v2_b0')
    src, dst = tmp_path / f'timm{suffix}', tmp_path / 'out' / 'official.pth'
    if suffix == '.safetensors':
        save_file(ref.state_dict(), str(src))
    else:
        torch.save(ref.state_dict(), src)
    monkeypatch.setattr('sys.argv', ['prog', str(src), str(dst)])
    cli.main()
    converted = torch.load(dst, weights_only=True)
    assert 'block1.0.mlp.dwconv.dwconv.weight' in converted
    model = PVTv2(arch='b0')
    model.load_state_dict(
        {k: v for k, v in converted.items() if not k.startswith('head.')},
        strict=True)
