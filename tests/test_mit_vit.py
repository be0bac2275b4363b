"""MesaMixVisionTransformer (SegFormer) and MesaVisionTransformer (ViT/DeiT):
mmseg equivalence, checkpoints, with_cp, Mesa coverage and gradients.

The mmseg backbone checks (shapes for several input sizes, argument errors,
out_indices, init_cfg/pretrained, with_cp, frozen parameters, norm_eval) are
run with the Mesa classes substituted.
"""
import copy

import pytest
import torch

import mesa_seg.register  # noqa: F401  (compat fixes and registration, as configs)
from mmseg.models.backbones import MixVisionTransformer, VisionTransformer
from mmseg.registry import MODELS

from mesa_seg.mesa import (QUANTIZER_ATTRS, MesaLayerNorm, MesaModule,
                           MesaMultiheadAttention, audit_saved_tensors, mesa_modules,
                           set_mesa_enabled)
from mesa_seg.models.backbones.mit import (ChannelsFirstMesaGELU, CheckpointMiTBlock,
                                           MesaMixVisionTransformer)
from mesa_seg.models.backbones.vit import CheckpointViTBlock, MesaVisionTransformer
from mesa_utils import assert_grad_close, eager_by_default  # noqa: F401  (fixture)

# Tiny MiT: four stages, heads (1, 2, 4, 8), spatial reduction in stages 1-3,
# drop path and attention dropout on (Mesa leaves torch's RNG draws alone).
MIT = dict(embed_dims=8, num_layers=[1, 2, 1, 1], num_heads=[1, 2, 4, 8],
           drop_path_rate=0.1, attn_drop_rate=0.1)
# Tiny ViT: patch 8, 3 blocks, outputs of blocks 1 and 2.
VIT = dict(img_size=(32, 32), patch_size=8, embed_dims=32, num_layers=3, num_heads=4,
           out_indices=(1, 2), drop_path_rate=0.1, attn_drop_rate=0.1)
ARCHS = {
    'mit': (MixVisionTransformer, MesaMixVisionTransformer, MIT),
    'vit': (VisionTransformer, MesaVisionTransformer, VIT),
}


def _build_pair(arch, seed=0, **kwargs):
    """mmseg's backbone and the Mesa class with the same weights (initialised
    under the same seed: Mesa's construction leaves torch's RNG alone)."""
    ref_cls, mesa_cls, cfg = ARCHS[arch]
    cfg = {**cfg, **kwargs}
    mesa = cfg.pop('mesa', dict())
    fused = cfg.pop('fused_attention', False)  # the Mesa classes' own argument
    torch.manual_seed(seed)
    ref = ref_cls(**cfg)
    ref.init_weights()
    torch.manual_seed(seed)
    model = mesa_cls(**cfg, mesa=mesa, fused_attention=fused)
    model.init_weights()
    return ref, model


def _is_quantizer_key(key):
    return any(part in QUANTIZER_ATTRS for part in key.split('.'))


def _fwd_bwd(model, x, seed=1):
    """Training forward + backward of a fixed random projection of all outputs."""
    model.train()
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    torch.manual_seed(seed)  # the same drop-path / dropout draws for every model
    outs = model(x)
    gen = torch.Generator().manual_seed(seed)
    loss = sum((o * torch.randn(o.shape, generator=gen)).sum() for o in outs)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    grads['input'] = x.grad
    return [o.detach() for o in outs], grads


def _assert_exact(outs, outs_ref):
    assert len(outs) == len(outs_ref)
    for o, o_ref in zip(outs, outs_ref):
        assert o.shape == o_ref.shape and torch.equal(o, o_ref)


def _assert_grads_equal(grads, grads_ref):
    assert grads.keys() == grads_ref.keys()
    for name, g in grads.items():
        torch.testing.assert_close(g, grads_ref[name], rtol=0, atol=0, msg=name)


# ------------------------------------------------------------ mmseg's checks
def test_registered():
    assert MODELS.get('MesaMixVisionTransformer') is MesaMixVisionTransformer
    assert MODELS.get('MesaVisionTransformer') is MesaVisionTransformer


@pytest.mark.parametrize('hw', [(64, 64), (64, 96), (63, 77)])
def test_mit_shapes(hw):
    """Stage i has embed_dims * heads[i] channels at 1 / (4 * 2**i) resolution
    (rounded up: overlapping patch embeddings pad by half the kernel)."""
    _, model = _build_pair('mit')
    outs, _ = _fwd_bwd(model, torch.randn(1, 3, *hw))
    h, w = hw
    for i, out in enumerate(outs):
        for _ in range(1 if i else 2):  # 7x7/4 then 3x3/2 convs, half padding
            h, w = (h + 1) // 2, (w + 1) // 2
        assert out.shape == (1, 8 * MIT['num_heads'][i], h, w)


@pytest.mark.parametrize('hw', [(32, 32), (32, 48), (41, 27)])
def test_vit_shapes(hw):
    """One output per out_indices entry, at 1/8 resolution (corner padding);
    the position embedding is resized for other input sizes."""
    _, model = _build_pair('vit')
    outs, _ = _fwd_bwd(model, torch.randn(2, 3, *hw))
    expected = (2, 32, -(-hw[0] // 8), -(-hw[1] // 8))
    assert [o.shape for o in outs] == [expected] * 2


@pytest.mark.parametrize('out_indices', [(0, ), (1, 3), (0, 1, 2, 3)])
def test_mit_out_indices(out_indices):
    _, model = _build_pair('mit', out_indices=out_indices)
    outs, _ = _fwd_bwd(model, torch.randn(1, 3, 64, 64))
    assert [o.shape[1] for o in outs] == [8 * MIT['num_heads'][i] for i in out_indices]


def test_vit_options():
    """out_indices as int, with_cls_token, output_cls_token, final/patch/pre norm."""
    x = torch.randn(1, 3, 32, 32)
    _, model = _build_pair('vit', out_indices=-1)
    assert model.out_indices == [2] and len(_fwd_bwd(model, x)[0]) == 1
    for kwargs in (dict(with_cls_token=False), dict(final_norm=True),
                   dict(patch_norm=True), dict(pre_norm=True), dict(out_origin=True)):
        ref, model = _build_pair('vit', **kwargs)
        _assert_exact(_fwd_bwd(model, x)[0], _fwd_bwd(ref, x)[0])
    _, model = _build_pair('vit', output_cls_token=True)
    model.train()
    feats = model(x)
    assert feats[0][0].shape == (1, 32, 4, 4) and feats[0][1].shape == (1, 32)


def test_argument_errors_as_mmseg():
    with pytest.raises(TypeError):
        MesaMixVisionTransformer(pretrained=123)
    with pytest.raises(AssertionError):
        MesaMixVisionTransformer(pretrained='a.pth', init_cfg=dict(type='Pretrained'))
    with pytest.raises(AssertionError):
        MesaMixVisionTransformer(**{**MIT, 'out_indices': (4, )})
    with pytest.raises(TypeError):
        MesaVisionTransformer(img_size=512.0)
    with pytest.raises(TypeError):
        MesaVisionTransformer(out_indices=1.)
    with pytest.raises(AssertionError):
        MesaVisionTransformer(img_size=(224, 224, 224))
    with pytest.raises(TypeError):
        MesaVisionTransformer(pretrained=123)
    with pytest.raises(AssertionError):
        MesaVisionTransformer(with_cls_token=False, output_cls_token=True)
    for cls, cfg in ((MesaMixVisionTransformer, MIT), (MesaVisionTransformer, VIT)):
        with pytest.raises(TypeError, match='mesa must be'):
            cls(**cfg, mesa='on')
        with pytest.raises(ValueError, match='unknown option'):
            cls(**cfg, mesa=dict(group=2))
        with pytest.raises(ValueError, match='with_cp must be'):
            cls(**cfg, with_cp='yes')
    with pytest.raises(ValueError, match='groups=3 does not divide'):
        MesaMixVisionTransformer(**MIT, mesa=dict(groups=3))


def test_pretrained_argument_becomes_init_cfg():
    for cls, cfg in ((MesaMixVisionTransformer, MIT), (MesaVisionTransformer, VIT)):
        with pytest.warns(UserWarning, match='pretrained is deprecated'):
            model = cls(**cfg, pretrained='weights.pth')
        assert model.init_cfg == dict(type='Pretrained', checkpoint='weights.pth')


def test_vit_frozen_parameters_and_norm_eval():
    _, model = _build_pair('vit', frozen_exclude=['cls_token', 'pos_embed'])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {'cls_token', 'pos_embed'}
    outs, grads = _fwd_bwd(model, torch.randn(1, 3, 32, 32))  # Mesa, frozen weights
    assert set(grads) == {'cls_token', 'pos_embed', 'input'}
    _, model = _build_pair('vit', norm_eval=True)
    model.train()
    assert all(not m.training for m in model.modules()
               if isinstance(m, torch.nn.LayerNorm))


# ------------------------------------------------------------ equivalence
@pytest.mark.parametrize('arch', ['mit', 'vit'])
def test_mesa_none_is_mmseg(arch):
    """mesa=None: mmseg's layers, keys, initial weights, outputs and gradients."""
    ref, model = _build_pair(arch, mesa=None)
    assert not mesa_modules(model)
    assert list(model.state_dict()) == list(ref.state_dict())
    for key, value in ref.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    x = torch.randn(2, 3, 48, 40)
    (outs, grads), (outs_ref, grads_ref) = _fwd_bwd(model, x), _fwd_bwd(ref, x)
    _assert_exact(outs, outs_ref)
    _assert_grads_equal(grads, grads_ref)


@pytest.mark.parametrize('arch,hw', [('mit', (64, 64)), ('mit', (57, 70)),
                                     ('vit', (32, 32)), ('vit', (40, 56))])
def test_mesa_forward_bit_exact_gradients_close(arch, hw):
    ref, model = _build_pair(arch)
    x = torch.randn(2, 3, *hw)
    (outs, grads), (outs_ref, grads_ref) = _fwd_bwd(model, x), _fwd_bwd(ref, x)
    _assert_exact(outs, outs_ref)
    assert grads.keys() == grads_ref.keys()
    flat = torch.cat([g.flatten() for g in grads.values()])
    flat_ref = torch.cat([grads_ref[k].flatten() for k in grads])
    assert_grad_close(flat_ref, flat, 'all gradients')  # cosine >= 0.999, rel. L2 <= 3 %
    # Switched off, the converted layers run the plain ops: gradients exact.
    assert set_mesa_enabled(model, False) > 0
    _assert_grads_equal(_fwd_bwd(model, x)[1], grads_ref)


@pytest.mark.parametrize('arch', ['mit', 'vit'])
def test_state_dict_keys_and_checkpoint_round_trip(arch):
    ref, model = _build_pair(arch)
    ref_keys, keys = set(ref.state_dict()), set(model.state_dict())
    assert ref_keys <= keys
    extra = keys - ref_keys
    assert extra and all(_is_quantizer_key(k) for k in extra)
    # mmseg -> Mesa: strict (the quantizer ranges start on the first batch)
    model.load_state_dict(ref.state_dict(), strict=True)
    # Mesa -> mmseg: strict once the quantizer state is dropped
    _fwd_bwd(model, torch.randn(1, 3, 32, 32))
    ref.load_state_dict({k: v for k, v in model.state_dict().items() if k in ref_keys})


@pytest.mark.parametrize('arch', ['mit', 'vit'])
def test_pretrained_checkpoint_through_init_cfg(arch, tmp_path):
    """An mmseg checkpoint (as written by mit2mmseg / vit2mmseg) loads via init_cfg."""
    ref_cls, _, cfg = ARCHS[arch]
    torch.manual_seed(0)
    ref = ref_cls(**cfg)
    ref.init_weights()
    ckpt = tmp_path / 'backbone.pth'
    torch.save(dict(state_dict=ref.state_dict()), ckpt)
    init_cfg = dict(type='Pretrained', checkpoint=str(ckpt))
    torch.manual_seed(1)
    model = MODELS.build(dict(type=f'Mesa{ref_cls.__name__}', **cfg, init_cfg=init_cfg))
    model.init_weights()
    sd = model.state_dict()
    for key, value in ref.state_dict().items():
        assert torch.equal(sd[key], value), key


def test_vit_pretrained_position_embedding_resized(tmp_path):
    """A checkpoint for another image size loads with the position embedding
    resized, exactly as mmseg's VisionTransformer resizes it."""
    torch.manual_seed(0)
    src = VisionTransformer(**{**VIT, 'img_size': (48, 48)})
    src.init_weights()
    ckpt = tmp_path / 'vit48.pth'
    torch.save(src.state_dict(), ckpt)
    ref = VisionTransformer(**VIT, pretrained=str(ckpt))
    model = MesaVisionTransformer(**VIT, pretrained=str(ckpt))
    ref.init_weights(), model.init_weights()
    assert model.pos_embed.shape == (1, 17, 32)
    assert torch.equal(model.pos_embed, ref.pos_embed)


# ------------------------------------------------------------ with_cp
@pytest.mark.parametrize('arch', ['mit', 'vit'])
@pytest.mark.parametrize('with_cp', [True, 'selective'])
def test_with_cp(arch, with_cp):
    """Checkpointed blocks give the outputs and gradients of unchecked ones:
    mmseg's model (mesa=None), and Mesa's own (its recomputation quantizes as
    the forward did, so even the Mesa gradients are identical)."""
    ref, plain = _build_pair(arch, mesa=None, with_cp=with_cp)
    blocks = [m for m in plain.modules() if isinstance(m, (CheckpointMiTBlock,
                                                           CheckpointViTBlock))]
    assert blocks and all(b.with_cp == with_cp for b in blocks)
    x = torch.randn(2, 3, 32, 32)
    ref.apply(lambda m: setattr(m, 'with_cp', False) if hasattr(m, 'with_cp') else None)
    outs_ref, grads_ref = _fwd_bwd(ref, x)
    outs, grads = _fwd_bwd(plain, x)
    _assert_exact(outs, outs_ref)
    _assert_grads_equal(grads, grads_ref)

    _, mesa = _build_pair(arch)
    _, mesa_cp = _build_pair(arch, with_cp=with_cp)
    (outs, grads), (outs_cp, grads_cp) = _fwd_bwd(mesa, x), _fwd_bwd(mesa_cp, x)
    _assert_exact(outs_cp, outs)
    _assert_grads_equal(grads_cp, grads)
    for key, value in mesa.state_dict().items():  # ranges updated once per step
        assert torch.equal(mesa_cp.state_dict()[key], value), key


# ------------------------------------------------------------ Mesa layout
def test_mit_mesa_layers_follow_heads():
    _, model = _build_pair('mit')
    heads = MIT['num_heads']
    first_embed = model.layers[0][0]
    assert type(first_embed.projection) is torch.nn.Conv2d  # reads the image
    assert isinstance(first_embed.norm, MesaLayerNorm)
    for i, (patch_embed, blocks, norm) in enumerate(model.layers):
        assert norm.quantizer.groups == heads[i]
        assert patch_embed.norm.quantizer.groups == heads[i]
        if i:
            assert patch_embed.projection.quantizer.groups == heads[i - 1]
        for block in blocks:
            attn = block.attn.attn
            assert isinstance(attn, MesaMultiheadAttention)
            assert attn.quantizer_attn.groups == attn.quantizer_in_q.groups == heads[i]
            gelu = block.ffn.activate
            assert type(gelu) is ChannelsFirstMesaGELU and gelu is block.ffn.layers[2]
            assert gelu.quantizer.dim == 1 and gelu.quantizer.groups == heads[i]
            for conv in (block.ffn.layers[0], block.ffn.layers[1], block.ffn.layers[4]):
                assert conv.quantizer.groups == heads[i]
            if block.attn.sr_ratio > 1:
                assert block.attn.sr.quantizer.groups == heads[i]
                assert block.attn.norm.quantizer.groups == heads[i]
    # A user policy still reaches MixFFN's GELU through its own pass.
    kept = MesaMixVisionTransformer(**MIT, mesa=dict(layers=('GELU', ), groups=2))
    gelus = {id(m) for m in kept.modules() if isinstance(m, MesaModule)}
    assert len(gelus) == 5 and all(
        type(m) is ChannelsFirstMesaGELU and m.quantizer.groups == 2
        for m in kept.modules() if isinstance(m, MesaModule))
    none = MesaMixVisionTransformer(**MIT, mesa=dict(exclude=(r'ffn\.activate$', )))
    assert not any(isinstance(m, ChannelsFirstMesaGELU) for m in none.modules())


def test_vit_mesa_layers_follow_heads():
    _, model = _build_pair('vit')
    assert type(model.patch_embed.projection) is torch.nn.Conv2d
    for layer in model.layers:
        assert layer.num_heads == 4
        attn = layer.attn.attn
        assert isinstance(attn, MesaMultiheadAttention)
        quantizers = [layer.ln1.quantizer, layer.ln2.quantizer,
                      layer.ffn.layers[0][0].quantizer, layer.ffn.layers[0][1].quantizer,
                      layer.ffn.layers[1].quantizer, attn.quantizer_in_q, attn.quantizer_q,
                      attn.quantizer_attn, attn.quantizer_out]
        assert [q.groups for q in quantizers] == [4] * len(quantizers)


# The recipes' sizes (the tiny test models are dominated by their image input).
MIT_B0 = dict(embed_dims=32, num_layers=[2, 2, 2, 2], num_heads=[1, 2, 5, 8],
              drop_path_rate=0.1)
DEIT_S = dict(img_size=(512, 512), embed_dims=384, num_layers=12, num_heads=6,
              out_indices=(2, 5, 8, 11), drop_path_rate=0.1,
              norm_cfg=dict(type='LN', eps=1e-6))


@pytest.mark.parametrize('arch,cfg,size', [('mit', MIT_B0, 128), ('vit', DEIT_S, 96)])
def test_mesa_saves_almost_everything_in_8_bits(arch, cfg, size):
    """MiT-B0 and DeiT-S: >= 90 % of the saved bytes in 8 bits or less; the
    rest is the image (the first conv's input), per-token LayerNorm
    statistics, per-group ranges, drop-path masks (B, 1, 1) and the fused
    attention's per-row log-sum-exp."""
    ref_cls, mesa_cls, _ = ARCHS[arch]
    torch.manual_seed(0)
    model = mesa_cls(**cfg)
    x = torch.randn(2, 3, size, size)
    records = audit_saved_tensors(model, x)
    compressed = sum(r.nbytes for r in records if r.compressed)
    total = sum(r.nbytes for r in records)
    assert compressed >= 0.9 * total, compressed / total
    assert total < 0.35 * sum(r.nbytes for r in audit_saved_tensors(ref_cls(**cfg), x))
    first_conv = 'layers.0.0.projection' if arch == 'mit' else 'patch_embed.projection'
    for r in records:
        if not r.compressed and r.nbytes:
            assert (r.module == first_conv or r.shape[-1] == 1 or len(r.shape) == 1
                    or r.shape == (2, 1, 1)), r


# ------------------------------------------------------------ generic policy
def _segmentor_cfg(backbone, in_channels, **kwargs):
    return dict(
        type='MesaEncoderDecoder', backbone=backbone,
        decode_head=dict(type='FCNHead', in_channels=in_channels, channels=8, num_convs=1,
                         num_classes=3, norm_cfg=dict(type='BN')), **kwargs)


def test_backbone_mesa_on_mmseg_mit():
    """backbone_mesa converts a plain mmseg backbone built from the config:
    same keys (plus quantizer buffers), same initial weights, exact forward."""
    from mmengine.registry import init_default_scope
    init_default_scope('mmseg')
    backbone = dict(type='MixVisionTransformer', **MIT, out_indices=(3, ))
    torch.manual_seed(0)
    ref = MODELS.build(_segmentor_cfg(backbone, 64))
    ref.init_weights()
    torch.manual_seed(0)
    model = MODELS.build(_segmentor_cfg(backbone, 64, backbone_mesa=dict()))
    model.init_weights()
    ref_keys = set(ref.backbone.state_dict())
    keys = set(model.backbone.state_dict())
    assert ref_keys <= keys and all(_is_quantizer_key(k) for k in keys - ref_keys)
    for key in ref_keys:
        assert torch.equal(model.backbone.state_dict()[key], ref.backbone.state_dict()[key])
    kinds = {type(m).__name__ for _, m in mesa_modules(model.backbone)}
    assert kinds == {'MesaMultiheadAttention', 'MesaLayerNorm', 'MesaConv2d', 'MesaGELU'}
    x = torch.randn(2, 3, 64, 64)
    (outs, grads), (outs_ref, grads_ref) = (_fwd_bwd(model.backbone, x),
                                            _fwd_bwd(ref.backbone, x))
    _assert_exact(outs, outs_ref)
    flat = torch.cat([g.flatten() for g in grads.values()])
    assert_grad_close(torch.cat([grads_ref[k].flatten() for k in grads]), flat)
    # The generic policy compresses everything here (mmseg's MiT has no
    # functional matmul): only statistics, ranges and drop-path masks remain.
    records = audit_saved_tensors(model.backbone, x)
    assert all(r.compressed or r.shape[-1] == 1 or len(r.shape) == 1
               or r.shape == (2, 1, 1) for r in records if r.nbytes)
    with pytest.raises(ValueError, match='already has Mesa layers'):
        MODELS.build(_segmentor_cfg(dict(type='MesaMixVisionTransformer', **MIT), 64,
                                    backbone_mesa=dict()))


def test_backbone_mesa_leaves_functional_ops_in_full_precision():
    """mmseg's Swin computes q @ k^T and attn @ v as functions: the generic
    policy converts its modules, and the audit shows those products as the
    full-precision remainder."""
    from mmseg.models.backbones import SwinTransformer

    from mesa_seg.mesa import MesaPolicy
    from mesa_seg.models.segmentors import apply_backbone_mesa_
    cfg = dict(embed_dims=16, depths=(1, 1), num_heads=(2, 4), strides=(4, 2),
               out_indices=(1, ), window_size=4, drop_path_rate=0.)
    torch.manual_seed(0)
    ref = SwinTransformer(**cfg)
    model = apply_backbone_mesa_(copy.deepcopy(ref), MesaPolicy())
    x = torch.randn(2, 3, 32, 32)
    _assert_exact(_fwd_bwd(model, x)[0], _fwd_bwd(ref, x)[0])
    raw = [r for r in audit_saved_tensors(model, x) if not r.compressed and r.nbytes]
    assert {r.op for r in raw if r.module.endswith('w_msa')} >= {'matmul'}
    assert all(r.module.endswith('w_msa') or r.shape[-1] == 1 or len(r.shape) == 1
               for r in raw), raw


def test_backbone_mesa_on_mmseg_resnet():
    """A conv backbone (SyncBN in the config: BatchNorm2d for one process),
    with per-channel ranges widened to each batch, as for the heads."""
    from mmseg.models.backbones import ResNet

    from mesa_seg.mesa import MesaBatchNorm2d, MesaPolicy
    from mesa_seg.models.segmentors import apply_backbone_mesa_, convert_sync_bn_to_bn2d
    torch.manual_seed(0)
    ref = ResNet(depth=18, stem_channels=8, base_channels=8, out_indices=(2, 3),
                 norm_cfg=dict(type='SyncBN', requires_grad=True))
    model = apply_backbone_mesa_(copy.deepcopy(ref),
                                 MesaPolicy(groups='channels', widen_to_batch=True))
    ref = convert_sync_bn_to_bn2d(ref)
    assert isinstance(model.bn1, MesaBatchNorm2d) and model.bn1.quantizer.groups == 8
    ref_keys = set(ref.state_dict())
    assert ref_keys <= set(model.state_dict())
    assert all(_is_quantizer_key(k) for k in set(model.state_dict()) - ref_keys)
    x = torch.randn(2, 3, 32, 32)
    (outs, grads), (outs_ref, grads_ref) = _fwd_bwd(model, x), _fwd_bwd(ref, x)
    _assert_exact(outs, outs_ref)
    flat = torch.cat([g.flatten() for g in grads.values()])
    assert_grad_close(torch.cat([grads_ref[k].flatten() for k in grads]), flat)
    raw = [r for r in audit_saved_tensors(model, x) if not r.compressed and r.nbytes]
    # Full precision: the max-pool (nn.MaxPool2d is not a Mesa layer type),
    # BatchNorm batch statistics and per-group ranges.
    assert raw and all(r.module == 'maxpool' or len(r.shape) == 1 for r in raw), raw


# ------------------------------------------------------------ fused attention
def _force_need_weights_false(model):
    """mmseg's model with every torch attention called with need_weights=False."""
    import functools
    for m in model.modules():
        if type(m) is torch.nn.MultiheadAttention:
            m.forward = functools.partial(type(m).forward, m, need_weights=False)
    return model


@pytest.mark.parametrize('arch', ['mit', 'vit'])
def test_fused_attention(arch):
    """fused_attention=True: torch's SDPA path (need_weights=False), exact
    against mmseg's model calling it so, with or without Mesa; no N x M tensor
    is saved, so Mesa stores less than on the explicit path. (No attention
    dropout, as in the recipes: with it, torch's CPU SDPA takes its math
    backend, whose probabilities Mesa stores in 8 bits.)"""
    ref, plain = _build_pair(arch, mesa=None, fused_attention=True, attn_drop_rate=0.)
    _, mesa = _build_pair(arch, fused_attention=True, attn_drop_rate=0.)
    _, explicit = _build_pair(arch, attn_drop_rate=0.)
    ref_sdpa = _force_need_weights_false(copy.deepcopy(ref))
    x = torch.randn(2, 3, 48, 48)
    outs_ref, grads_ref = _fwd_bwd(ref_sdpa, x)
    outs, grads = _fwd_bwd(plain, x)
    _assert_exact(outs, outs_ref)
    _assert_grads_equal(grads, grads_ref)
    outs, grads = _fwd_bwd(mesa, x)
    _assert_exact(outs, outs_ref)
    flat = torch.cat([g.flatten() for g in grads.values()])
    assert_grad_close(torch.cat([grads_ref[k].flatten() for k in grads]), flat)
    # The same attention as mmseg's default call, up to float rounding.
    for o, o_ref in zip(outs, _fwd_bwd(ref, x)[0]):
        torch.testing.assert_close(o, o_ref, rtol=1e-4, atol=1e-5)
    # Fused stores q, k, v, output (8 bits) and a float per query row where the
    # explicit path stores N x M probabilities (8 bits): a saving once the keys
    # outnumber head_dim + 4 (at 128 px, MiT's first stage has 16 keys).
    x = torch.randn(1, 3, 128, 128)
    fused = sum(r.nbytes for r in audit_saved_tensors(mesa, x))
    assert fused < sum(r.nbytes for r in audit_saved_tensors(explicit, x))
    assert set(mesa.state_dict()) == set(explicit.state_dict())
