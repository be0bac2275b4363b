"""MesaSwinTransformer: mmseg equivalence, checkpoints, Mesa memory and gradients,
activation checkpointing."""
# First: importing backbone_utils registers mesa-seg before mmseg is imported.
from backbone_utils import checkpointing_saved_bytes, fwd_bwd
import pytest
import torch
from mmseg.models.backbones import SwinTransformer
from mmseg.registry import MODELS

from mesa_seg.mesa import (ActivationQuantizer, MesaLayerNorm, MesaLinear, MesaModule,
                           audit_saved_tensors, set_mesa_enabled)
from mesa_seg.models.backbones.swin import (CheckpointSwinBlock,
                                            MesaSwinTransformer, MesaWindowMSA)
# Eager Mesa kernels (autouse): the compiled ones are tested by the core's tests.
from mesa_utils import eager_by_default  # noqa: F401

# Four stages, a shifted-window block in stage 3, one head per 8 channels.
# No drop path by default: Mesa's stochastic rounding draws its seeds from
# torch's RNG, so drop-path masks of a Mesa and an FP32 run would differ.
TINY = dict(
    embed_dims=32,
    depths=(1, 1, 2, 1),
    num_heads=(1, 2, 4, 8),
    window_size=7,
    drop_path_rate=0.)


def _build_pair(seed=0, **kwargs):
    """mmseg's SwinTransformer and a MesaSwinTransformer with the same weights."""
    cfg = {**TINY, **kwargs}
    mesa = cfg.pop('mesa', None)
    torch.manual_seed(seed)
    ref = SwinTransformer(**cfg)
    ref.init_weights()
    model = MesaSwinTransformer(**cfg, mesa=mesa)
    model.load_state_dict(ref.state_dict(), strict=False)
    return ref, model


_QUANTIZER_STATE = set(ActivationQuantizer().state_dict())


def _is_quantizer_state(key):
    return key.rsplit('.', 1)[-1] in _QUANTIZER_STATE


def _cosine(grads, grads_ref):
    a = torch.cat([g.flatten().double() for g in grads.values()])
    b = torch.cat([grads_ref[k].flatten().double() for k in grads])
    return torch.nn.functional.cosine_similarity(a, b, dim=0).item()


@pytest.mark.parametrize('hw', [(64, 64), (112, 137)])
def test_fp32_matches_mmseg(hw):
    ref, model = _build_pair(drop_path_rate=0.3)
    x = torch.randn(2, 3, *hw)
    outs_ref, grads_ref = fwd_bwd(ref, x)
    outs, grads = fwd_bwd(model, x)
    assert [o.shape for o in outs] == [o.shape for o in outs_ref]
    for o, o_ref in zip(outs, outs_ref):
        torch.testing.assert_close(o, o_ref, rtol=0, atol=0)
    assert grads.keys() == grads_ref.keys()
    for name, g in grads.items():
        torch.testing.assert_close(g, grads_ref[name], msg=name)


def test_same_seed_same_weights_and_keys():
    torch.manual_seed(0)
    ref = SwinTransformer(**TINY)
    torch.manual_seed(0)
    model = MesaSwinTransformer(**TINY, mesa=None)
    ref_sd, sd = ref.state_dict(), model.state_dict()
    assert list(sd) == list(ref_sd)
    for k in sd:
        assert torch.equal(sd[k], ref_sd[k]), k
    ref.load_state_dict(sd, strict=True)


def test_window_attention_uses_matmul_modules():
    model = MesaSwinTransformer(**TINY, mesa=None)
    for stage, heads in zip(model.stages, TINY['num_heads']):
        assert stage.num_heads == heads
        for block in stage.blocks:
            assert block.num_heads == block.attn.num_heads == heads
            w_msa = block.attn.w_msa
            assert isinstance(w_msa, MesaWindowMSA) and w_msa.num_heads == heads
            assert {'qk_matmul', 'softmax', 'av_matmul'} <= dict(
                w_msa.named_children()).keys()


# Dropout, attention dropout and drop path: checkpointing must replay the draws.
CP_DROPS = dict(drop_rate=0.1, attn_drop_rate=0.1, drop_path_rate=0.3)


@pytest.mark.filterwarnings('ignore:torch.utils.checkpoint')  # mmseg's call
def test_with_cp_matches_mmseg():
    """with_cp=True: our blocks run torch's non-reentrant checkpoint, mmseg's
    the reentrant one; outputs and gradients are the same, bit for bit."""
    ref, model = _build_pair(with_cp=True, **CP_DROPS)
    assert all(type(block) is CheckpointSwinBlock
               for stage in model.stages for block in stage.blocks)
    x = torch.randn(1, 3, 64, 64)
    outs_ref, grads_ref = fwd_bwd(ref, x)
    outs, grads = fwd_bwd(model, x)
    for o, o_ref in zip(outs, outs_ref):
        assert torch.equal(o, o_ref)
    assert grads.keys() == grads_ref.keys()
    for name, g in grads.items():
        assert torch.equal(g, grads_ref[name]), name


@pytest.mark.parametrize('mesa', [None, dict()], ids=['fp32', 'mesa'])
def test_with_cp_exact_and_saves_memory(mesa):
    """True and 'selective' give the outputs and gradients of False, bit for
    bit, in training mode with every kind of dropout; under Mesa they also
    leave the running ranges and rounding steps as one step without
    checkpointing does (the recomputation replays the forward's quantization)."""
    x = torch.randn(1, 3, 64, 64)

    def build(with_cp):
        torch.manual_seed(0)
        return MesaSwinTransformer(**{**TINY, **CP_DROPS}, with_cp=with_cp,
                                   mesa=mesa)

    nbytes = checkpointing_saved_bytes(build, x)
    assert nbytes[True] < nbytes['selective'], nbytes
    if mesa is None:
        assert nbytes['selective'] < nbytes[False], nbytes
    else:
        # Selective checkpointing keeps FP32 matmul outputs, which can outweigh
        # Mesa's 8-bit copies of everything: only True is sure to save here.
        assert nbytes[True] < nbytes[False], nbytes


def test_selective_fp32_is_mmseg_drop_in():
    """MesaSwinTransformer(mesa=None, with_cp='selective'): mmseg's keys, weights
    (same seed), outputs and gradients."""
    torch.manual_seed(0)
    cfg = {**TINY, **CP_DROPS}
    ref = SwinTransformer(**cfg)
    torch.manual_seed(0)
    model = MODELS.build(dict(type='MesaSwinTransformer', **cfg, mesa=None,
                              with_cp='selective'))
    ref_sd, sd = ref.state_dict(), model.state_dict()
    assert list(sd) == list(ref_sd)
    assert all(torch.equal(sd[k], ref_sd[k]) for k in sd)
    ref.load_state_dict(sd, strict=True)
    x = torch.randn(1, 3, 64, 64)
    outs_ref, grads_ref = fwd_bwd(ref, x)
    outs, grads = fwd_bwd(model, x)
    for o, o_ref in zip(outs, outs_ref):
        assert torch.equal(o, o_ref)
    for name, g in grads.items():
        assert torch.equal(g, grads_ref[name]), name


def test_bad_with_cp():
    for bad in ('full', 'Selective', 1, None):
        with pytest.raises(ValueError, match="with_cp must be False, True"):
            MesaSwinTransformer(**TINY, with_cp=bad, mesa=None)


def test_registry_and_pretrained_checkpoint(tmp_path):
    """An mmseg checkpoint (segmentor keys, 'backbone.' prefix) loads via init_cfg."""
    torch.manual_seed(0)
    ref = SwinTransformer(**TINY)
    ref.init_weights()
    ckpt = tmp_path / 'upernet_swin.pth'
    torch.save(
        dict(state_dict={f'backbone.{k}': v
                         for k, v in ref.state_dict().items()}), ckpt)
    model = MODELS.build(
        dict(
            type='MesaSwinTransformer',
            **TINY,
            init_cfg=dict(type='Pretrained', checkpoint=str(ckpt))))
    model.init_weights()
    sd = model.state_dict()
    for k, v in ref.state_dict().items():
        assert torch.equal(sd[k], v), k


def test_mesa_disabled_builds_plain_layers():
    ref, model = _build_pair(mesa=dict(enabled=False))
    assert not any(isinstance(m, MesaModule) for m in model.modules())
    x = torch.randn(1, 3, 64, 64)
    outs_ref, grads_ref = fwd_bwd(ref, x)
    outs, grads = fwd_bwd(model, x)
    for o, o_ref in zip(outs, outs_ref):
        torch.testing.assert_close(o, o_ref, rtol=0, atol=0)
    for name, g in grads.items():
        torch.testing.assert_close(g, grads_ref[name], msg=name)


def test_bad_mesa_option():
    with pytest.raises(TypeError, match='mesa must be'):
        MesaSwinTransformer(**TINY, mesa='on')
    with pytest.raises(ValueError, match='unknown option'):
        MesaSwinTransformer(**TINY, mesa=dict(group=2))
    # 5 groups cannot split the 32 channels of the first stage
    with pytest.raises(ValueError, match='groups=5 does not divide'):
        MesaSwinTransformer(**TINY, mesa=dict(groups=5))


def test_mesa_groups_follow_heads():
    model = MesaSwinTransformer(**TINY)
    # The patch embedding stays full precision (default Swin policy).
    assert type(model.patch_embed.projection) is torch.nn.Conv2d
    assert type(model.patch_embed.norm) is torch.nn.LayerNorm
    for stage, heads in zip(model.stages, TINY['num_heads']):
        for block in stage.blocks:
            w_msa = block.attn.w_msa
            quantizers = [
                block.norm1.quantizer, block.norm2.quantizer,
                block.ffn.layers[0][0].quantizer,
                block.ffn.layers[0][1].quantizer,
                block.ffn.layers[1].quantizer, w_msa.qkv.quantizer,
                w_msa.proj.quantizer, w_msa.softmax.quantizer,
                w_msa.qk_matmul.quantizer_a, w_msa.qk_matmul.quantizer_b,
                w_msa.av_matmul.quantizer_a, w_msa.av_matmul.quantizer_b
            ]
            assert [q.groups for q in quantizers] == [heads] * len(quantizers)
            # attention tensors (B, heads, N, D) are grouped along the heads
            assert w_msa.softmax.quantizer.dim == 1
            assert w_msa.qk_matmul.quantizer_b.dim == 1
        if stage.downsample is not None:
            assert isinstance(stage.downsample.norm, MesaLayerNorm)
            assert isinstance(stage.downsample.reduction, MesaLinear)
            assert stage.downsample.norm.quantizer.groups == heads
    # Output norms sit outside any stage: one group.
    assert model.norm3.quantizer.groups == 1


def test_mesa_state_dict_compatible_with_mmseg():
    ref, model = _build_pair(mesa=dict())
    ref_keys, keys = set(ref.state_dict()), set(model.state_dict())
    assert ref_keys <= keys
    extra = keys - ref_keys
    assert extra and all(_is_quantizer_state(k) for k in extra)
    # mmseg -> Mesa: strict (quantizer ranges initialise on the first batch)
    model.load_state_dict(ref.state_dict(), strict=True)
    # Mesa -> mmseg: strict once the quantizer state is dropped
    model.train()
    model(torch.randn(1, 3, 64, 64))
    ref.load_state_dict({
        k: v
        for k, v in model.state_dict().items() if not _is_quantizer_state(k)
    })


@pytest.mark.parametrize('hw', [(64, 64), (112, 137)])
def test_mesa_exact_forward_close_gradients(hw):
    ref, model = _build_pair(mesa=dict())
    x = torch.randn(2, 3, *hw)
    outs_ref, grads_ref = fwd_bwd(ref, x)
    outs, grads = fwd_bwd(model, x)
    for o, o_ref in zip(outs, outs_ref):
        torch.testing.assert_close(o, o_ref, rtol=0, atol=0)
    assert _cosine(grads, grads_ref) >= 0.995
    # Switched off, the converted layers run the plain ops: gradients exact.
    assert set_mesa_enabled(model, False) > 0
    _, grads_off = fwd_bwd(model, x)
    for name, g in grads_off.items():
        torch.testing.assert_close(g, grads_ref[name], msg=name)


def test_mesa_saves_activations_in_8_bits():
    ref, model = _build_pair(mesa=dict())
    x = torch.randn(2, 3, 64, 64)
    ref_records = audit_saved_tensors(ref, x)
    records = audit_saved_tensors(model, x)
    ref_bytes = sum(r.nbytes for r in ref_records)
    mesa_bytes = sum(r.nbytes for r in records)
    assert mesa_bytes < 0.4 * ref_bytes
    # Full precision is left only in the patch embedding, per-token LayerNorm
    # statistics (B, N, 1) and the quantizers' per-group ranges (groups, ).
    uncompressed = [r for r in records if not r.compressed and r.nbytes]
    assert uncompressed
    for r in uncompressed:
        assert (r.module.startswith('patch_embed') or r.shape[-1] == 1
                or len(r.shape) == 1), r


@pytest.mark.filterwarnings('ignore:torch.utils.checkpoint')  # mmseg's call
@pytest.mark.parametrize('drop_path_rate,stochastic_rounding', [
    (0., True),
    (0.5, False),
    (0.5, True),  # rounding seeds never touch the global RNG drop path draws from
])
def test_mesa_with_cp(drop_path_rate, stochastic_rounding):
    # Mesa's rounding seeds come from its own counters, so the forward and the
    # checkpoint recomputation draw the same drop-path masks as the FP32 model.
    ref, model = _build_pair(
        mesa=dict(stochastic_rounding=stochastic_rounding),
        with_cp=True,
        drop_path_rate=drop_path_rate,
        depths=(3, ),
        num_heads=(2, ),
        strides=(4, ),
        out_indices=(0, ))
    x = torch.randn(4, 3, 64, 64)
    outs_ref, grads_ref = fwd_bwd(ref, x)
    outs, grads = fwd_bwd(model, x)
    for o, o_ref in zip(outs, outs_ref):
        torch.testing.assert_close(o, o_ref, rtol=0, atol=0)
    assert _cosine(grads, grads_ref) >= 0.995
    # The recomputation quantized the blocks: their ranges are initialised.
    assert bool(model.stages[0].blocks[2].norm1.quantizer.initialized.all())


def test_mesa_under_bf16_autocast():
    """The AMP configs: exact forward, close gradients, 8-bit storage."""
    ref, model = _build_pair(mesa=dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        outs_ref, grads_ref = fwd_bwd(ref, x)
        outs, grads = fwd_bwd(model, x)
        ref_bytes = sum(r.nbytes for r in audit_saved_tensors(ref, x))
        mesa_bytes = sum(r.nbytes for r in audit_saved_tensors(model, x))
    assert outs[0].dtype == torch.bfloat16
    for o, o_ref in zip(outs, outs_ref):
        torch.testing.assert_close(o, o_ref, rtol=0, atol=0)
    assert _cosine(grads, grads_ref) >= 0.995
    assert mesa_bytes < 0.4 * ref_bytes
