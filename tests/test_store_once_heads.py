"""UPerHead's bottleneck input stored at the resolutions it is made of.

``resize_cat_conv2d`` is ``conv2d(cat([maps[0], *resized others]))``: forward
checked bit for bit against torch, gradients against full precision and
against the plain Mesa conv (which stores the whole concatenation), saved
bytes counted exactly. ``StoreOnceUPerHead`` against mmseg's ``UPerHead``.
"""
import copy

# First: importing backbone_utils registers mesa-seg before mmseg is imported.
import backbone_utils  # noqa: F401
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mesa_seg.mesa import (ActivationQuantizer, MesaConv2d, MesaModule, MesaPolicy,
                           QuantizerConfig, mesafy_)
from mesa_seg.mesa.shared_ops import resize_cat_conv2d, resized_cat_conv, use_store_once
from mesa_utils import assert_grad_close, eager_by_default, saved_bytes  # noqa: F401

SIZE = 16
CHANNELS = (8, 8, 8, 16)


def _maps(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, c, SIZE >> i, SIZE >> i, generator=g).to(dtype).requires_grad_()
            for i, c in enumerate(CHANNELS)]


def _reference(maps, conv, align_corners):
    full = [maps[0]] + [F.interpolate(m, size=(SIZE, SIZE), mode='bilinear',
                                      align_corners=align_corners) for m in maps[1:]]
    return conv(torch.cat(full, 1))


def _grads(y, leaves, g_out):
    return torch.autograd.grad(y, leaves, g_out)


@pytest.mark.parametrize('align_corners', [False, True])
@pytest.mark.parametrize('kernel', [1, 3])
def test_forward_exact_gradients_close_pieces_stored_small(align_corners, kernel):
    torch.manual_seed(0)
    conv = nn.Conv2d(sum(CHANNELS), 12, kernel, padding=kernel // 2)
    maps = _maps()
    quantizer = ActivationQuantizer(QuantizerConfig(groups=sum(CHANNELS)), dim=1)
    y_ref = _reference(maps, conv, align_corners)
    y, nbytes = saved_bytes(lambda: resize_cat_conv2d(
        list(maps), align_corners, conv.weight, conv.bias, conv.stride, conv.padding,
        conv.dilation, conv.groups, quantizer), exclude=list(conv.parameters()))
    assert torch.equal(y, y_ref)
    # 8-bit codes of every map at its own size, plus each map's (lo, rng) per channel.
    assert nbytes == sum(m.numel() + 2 * 4 * m.shape[1] for m in maps)
    full_codes = 2 * sum(CHANNELS) * SIZE * SIZE
    assert nbytes < 0.45 * full_codes
    g_out = torch.randn_like(y)
    leaves = [*maps, conv.weight, conv.bias]
    for i, (a, b) in enumerate(zip(_grads(y_ref, leaves, g_out), _grads(y, leaves, g_out))):
        if i < len(maps) or i == len(leaves) - 1:
            # The input and bias gradients read no stored activation (float
            # summation order only).
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
        else:
            assert_grad_close(a, b, 'weight')


def test_running_range_is_the_concatenations():
    # Maps at one resolution: the range over the pieces is the range a plain
    # Mesa conv keeps for their concatenation (the batch's per-channel min/max).
    torch.manual_seed(0)
    maps = [torch.randn(2, 4, 8, 8) * (i + 1) for i in range(3)]
    whole = ActivationQuantizer(QuantizerConfig(groups=12), dim=1)
    pieces = copy.deepcopy(whole)
    whole.pack(torch.cat(maps, 1))
    packed = [pieces.pack_with(m, *r) for m, r in zip(maps, pieces.block_ranges(maps))]
    torch.testing.assert_close(pieces.running_min, whole.running_min, rtol=0, atol=0)
    torch.testing.assert_close(pieces.running_range, whole.running_range, rtol=0, atol=0)
    assert [p.q.shape for p in packed] == [(2, 4, 64)] * 3


def test_pieces_must_hold_whole_groups():
    quantizer = ActivationQuantizer(QuantizerConfig(groups=4), dim=1)  # 3 channels a group
    with pytest.raises(ValueError, match='whole groups'):
        quantizer.block_ranges([torch.randn(1, 4, 2, 2), torch.randn(1, 8, 2, 2)])


def _mesa_conv(groups='channels'):
    torch.manual_seed(0)
    conv = mesafy_(nn.Sequential(nn.Conv2d(sum(CHANNELS), 12, 3, padding=1)),
                   MesaPolicy(groups=groups))[0]
    assert isinstance(conv, MesaConv2d)
    return conv


@pytest.mark.parametrize('case', ['store_once_off', 'eval', 'one_group', 'grouped_conv'])
def test_falls_back_to_the_plain_mesa_conv(case):
    conv = _mesa_conv(groups=1 if case == 'one_group' else 'channels')
    if case == 'grouped_conv':
        conv = mesafy_(nn.Sequential(nn.Conv2d(sum(CHANNELS), 8, 1, groups=2)),
                       MesaPolicy(groups='channels'))[0]
    if case == 'eval':
        conv.eval()
    maps = _maps()
    plain = copy.deepcopy(conv)
    with use_store_once(case != 'store_once_off'):
        y, nbytes = saved_bytes(lambda: resized_cat_conv(list(maps), False, conv),
                                exclude=list(conv.parameters()))
    y_ref, ref_bytes = saved_bytes(lambda: _reference(maps, plain, False),
                                   exclude=list(plain.parameters()))
    assert torch.equal(y, y_ref) and nbytes == ref_bytes


def test_store_once_conv_uses_the_conv_quantizer():
    conv = _mesa_conv()
    maps = _maps()
    y = resized_cat_conv(maps, False, conv)
    assert maps == []  # released once concatenated
    assert bool(conv.quantizer.initialized.all())
    assert int(conv.quantizer.rounding_step) == len(CHANNELS)  # a seed per piece
    y.sum().backward()
    assert conv.weight.grad is not None


def test_frozen_weight_keeps_no_codes_and_input_gradients_exact():
    conv = _mesa_conv()
    conv.weight.requires_grad_(False)
    maps = _maps()
    y, nbytes = saved_bytes(lambda: resized_cat_conv(list(maps), False, conv),
                            exclude=list(conv.parameters()))
    assert nbytes == 0
    g_out = torch.randn_like(y)
    ref = _reference(maps, copy.deepcopy(conv).float().requires_grad_(False), False)
    for a, b in zip(_grads(ref, maps, g_out), _grads(y, maps, g_out)):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_autocast_bf16_forward_exact():
    conv = _mesa_conv()
    maps = _maps()
    plain = copy.deepcopy(conv)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        y = resized_cat_conv(list(maps), False, conv)
        with use_store_once(False):
            y_ref = _reference(maps, plain, False)
    assert y.dtype == torch.bfloat16 and torch.equal(y, y_ref)
    g_out = torch.randn_like(y)
    for m, a, b in zip(maps, _grads(y_ref, maps, g_out), _grads(y, maps, g_out)):
        assert b.dtype == m.dtype
        torch.testing.assert_close(b, a, rtol=2e-2, atol=1e-2)


# ------------------------------------------------------------------ UPerHead
def _uper_heads():
    from mmseg.models.decode_heads import UPerHead

    from mesa_seg.models.decode_heads import StoreOnceUPerHead, store_once_heads_
    from mesa_seg.models.segmentors import HEAD_MESA_DEFAULTS
    torch.manual_seed(0)
    ref = UPerHead(in_channels=[8, 16, 32, 64], in_index=[0, 1, 2, 3], channels=16,
                   pool_scales=(1, 2, 3, 6), num_classes=5, dropout_ratio=0.1,
                   norm_cfg=dict(type='BN', requires_grad=True), align_corners=False)
    mesa = mesafy_(copy.deepcopy(ref), MesaPolicy.from_arg({}, HEAD_MESA_DEFAULTS))
    store_once = copy.deepcopy(mesa)
    assert store_once_heads_(store_once) == 1 and type(store_once) is StoreOnceUPerHead
    return ref, mesa, store_once


def _head_step(head, seed=1, channels=(8, 16, 32, 64)):
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(2, c, 32 >> i, 32 >> i, generator=g).requires_grad_()
          for i, c in enumerate(channels)]
    torch.manual_seed(seed)  # dropout
    y, nbytes = saved_bytes(lambda: head(xs), exclude=list(head.parameters())
                            + list(head.buffers()))
    y.backward(torch.ones_like(y))
    return y, nbytes, {n: p.grad for n, p in head.named_parameters()}


@pytest.mark.parametrize('kind', ['uperhead', 'segformer_head'])
def test_store_once_head_exact_fewer_bytes_close_gradients(kind):
    if kind == 'uperhead':
        (ref, mesa, store_once), channels = _uper_heads(), (8, 16, 32, 64)
    else:
        (ref, mesa, store_once), channels = _segformer_heads(), SEGFORMER_CHANNELS
    y_ref, _, g_ref = _head_step(ref, channels=channels)
    y_mesa, mesa_bytes, g_mesa = _head_step(mesa, channels=channels)
    y, nbytes, g = _head_step(store_once, channels=channels)
    assert torch.equal(y, y_ref) and torch.equal(y_mesa, y_ref)
    # The fusing conv's input, four 16-channel maps concatenated at 32x32
    # (8-bit): its three upsampled quarters are stored at 16x16, 8x8 and 4x4.
    dropped = 2 * 16 * (3 * 32 * 32 - (16 * 16 + 8 * 8 + 4 * 4))
    assert mesa_bytes - nbytes == dropped
    assert store_once.state_dict().keys() == mesa.state_dict().keys()
    for name in g_ref:
        assert_grad_close(g_ref[name], g[name], name)


def test_store_once_uperhead_eval_is_mmseg():
    ref, _, store_once = _uper_heads()
    ref.eval(), store_once.eval()
    xs = [torch.randn(1, c, 32 >> i, 32 >> i) for i, c in enumerate([8, 16, 32, 64])]
    with torch.no_grad():
        assert torch.equal(store_once(xs), ref(xs))


SEGMENTOR_HEADS = {
    'StoreOnceUPerHead': dict(
        backbone=dict(type='ResNetV1c', depth=18, num_stages=4, out_indices=(0, 1, 2, 3),
                      norm_cfg=dict(type='BN')),
        decode_head=dict(type='UPerHead', in_channels=[64, 128, 256, 512],
                         in_index=[0, 1, 2, 3], pool_scales=(1, 2), channels=16,
                         num_classes=3, norm_cfg=dict(type='BN'))),
    'StoreOnceSegformerHead': dict(
        backbone=dict(type='MixVisionTransformer', in_channels=3, embed_dims=8,
                      num_stages=4, num_layers=[1, 1, 1, 1], num_heads=[1, 1, 1, 1],
                      patch_sizes=[7, 3, 3, 3], sr_ratios=[8, 4, 2, 1]),
        decode_head=dict(type='SegformerHead', in_channels=[8, 16, 32, 64],
                         in_index=[0, 1, 2, 3], channels=16, num_classes=3,
                         norm_cfg=dict(type='BN'))),
}


@pytest.mark.parametrize('store_once_class', sorted(SEGMENTOR_HEADS))
def test_segmentor_swaps_head_only_with_mesa_on(store_once_class):
    from mmseg.registry import MODELS
    model = dict(type='MesaEncoderDecoder', mesa=dict(), **SEGMENTOR_HEADS[store_once_class])
    head = MODELS.build(model).decode_head
    assert store_once_class in [c.__name__ for c in type(head).__mro__]
    plain = MODELS.build(dict(model, mesa=None)).decode_head
    assert store_once_class not in [c.__name__ for c in type(plain).__mro__]


# ------------------------------------------------------------- SegformerHead
SEGFORMER_CHANNELS = [8, 16, 24, 32]


def _segformer_heads(interpolate_mode='bilinear'):
    from mmseg.models.decode_heads import SegformerHead

    from mesa_seg.models.decode_heads import StoreOnceSegformerHead, store_once_heads_
    from mesa_seg.models.segmentors import HEAD_MESA_DEFAULTS
    torch.manual_seed(0)
    ref = SegformerHead(in_channels=SEGFORMER_CHANNELS, in_index=[0, 1, 2, 3], channels=16,
                        num_classes=5, dropout_ratio=0.1, interpolate_mode=interpolate_mode,
                        norm_cfg=dict(type='BN', requires_grad=True),
                        # torch refuses align_corners for 'nearest'
                        align_corners=False if interpolate_mode == 'bilinear' else None)
    mesa = mesafy_(copy.deepcopy(ref), MesaPolicy.from_arg({}, HEAD_MESA_DEFAULTS))
    store_once = copy.deepcopy(mesa)
    assert store_once_heads_(store_once) == 1 and type(store_once) is StoreOnceSegformerHead
    return ref, mesa, store_once


@pytest.mark.parametrize('case', ['eval', 'nearest'])
def test_store_once_segformer_head_is_mmseg_where_it_does_not_apply(case):
    ref, mesa, store_once = _segformer_heads('nearest' if case == 'nearest' else 'bilinear')
    if case == 'eval':
        ref.eval(), mesa.eval(), store_once.eval()
    y_ref, _, _ = _head_step(ref, channels=SEGFORMER_CHANNELS)
    y_mesa, mesa_bytes, _ = _head_step(mesa, channels=SEGFORMER_CHANNELS)
    y, nbytes, _ = _head_step(store_once, channels=SEGFORMER_CHANNELS)
    assert torch.equal(y, y_ref)
    assert nbytes == mesa_bytes  # the plain Mesa head's storage, nothing dropped
