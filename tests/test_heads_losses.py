"""Mesa for neck/decode heads (MesaEncoderDecoder) and the fused resize+CE loss."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mesa_seg.register  # noqa: F401  (compat fixes + registration before mmseg is imported)
from mmengine.structures import PixelData
from mmseg.models.losses import accuracy
from mmseg.registry import MODELS
from mmseg.structures import SegDataSample
from mmseg.utils import register_all_modules

from mesa_seg.mesa import (QUANTIZER_ATTRS, MesaBatchNorm2d, MesaConv2d, MesaModule,
                           MesaSyncBatchNorm, audit_saved_tensors)
from mesa_seg.memory.measure import _loss_label
from mesa_seg.memory.meters import CPUAllocatorTrace
from mesa_seg.models import losses as fused_losses
from mesa_seg.models.losses import _accuracy_from_pred, resize_cross_entropy
from mesa_seg.strategies import LOSS_FUSED, LOSS_FUSED_8BIT

register_all_modules(init_default_scope=True)

SIZE, NUM_CLASSES, IGNORE = 64, 7, 255


def _cosine(a, b):
    return F.cosine_similarity(a.double().flatten(), b.double().flatten(), 0).item()


def _labels(batch=2, size=SIZE, seed=0):
    g = torch.Generator().manual_seed(seed)
    label = torch.randint(0, NUM_CLASSES, (batch, size, size), generator=g)
    label[:, :5] = IGNORE  # an ignored band, like ADE20K's "other" under reduce_zero_label
    return label


def _mmseg_loss(logits, label, align_corners, avg_non_ignore):
    up = F.interpolate(logits, size=label.shape[-2:], mode='bilinear', align_corners=align_corners)
    loss_fn = MODELS.build(dict(type='CrossEntropyLoss', avg_non_ignore=avg_non_ignore))
    return loss_fn(up, label, ignore_index=IGNORE)


@pytest.mark.parametrize('align_corners', [False, True])
@pytest.mark.parametrize('avg_non_ignore', [False, True])
@pytest.mark.parametrize('memory_format', [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize('classes_per_block', [NUM_CLASSES, 3, 1])
def test_resize_cross_entropy_matches_mmseg(monkeypatch, align_corners, avg_non_ignore,
                                            memory_format, classes_per_block):
    # 7 classes in blocks of 7, of 3 (3 + 3 + 1) and of 1: the streamed
    # log-sum-exp, label score and argmax across blocks.
    monkeypatch.setattr(fused_losses, '_BLOCK_ELEMENTS', classes_per_block * SIZE * SIZE)
    torch.manual_seed(0)
    logits = torch.randn(2, NUM_CLASSES, SIZE // 4, SIZE // 4).to(memory_format=memory_format)
    logits.requires_grad_()
    fused_in = logits.detach().clone().requires_grad_()
    label = _labels()
    ref = _mmseg_loss(logits, label, align_corners, avg_non_ignore)
    fused = resize_cross_entropy(fused_in, label, align_corners, IGNORE, avg_non_ignore)
    # Same ops, summed per image instead of over the batch: float rounding only.
    torch.testing.assert_close(fused, ref, rtol=1e-5, atol=1e-6)
    ref.backward()
    fused.backward()
    torch.testing.assert_close(fused_in.grad, logits.grad, rtol=1e-4, atol=1e-7)
    # The predictions for accuracy come from the same upsampled logits.
    fused_in.grad = None
    again, pred = resize_cross_entropy(fused_in, label, align_corners, IGNORE, avg_non_ignore,
                                       return_pred=True)
    up = F.interpolate(logits.detach(), size=label.shape[-2:], mode='bilinear',
                       align_corners=align_corners)
    assert torch.equal(pred, up.argmax(1)) and not pred.requires_grad
    assert torch.equal(again, fused)
    again.backward()
    torch.testing.assert_close(fused_in.grad, logits.grad, rtol=1e-4, atol=1e-7)


def test_resize_cross_entropy_keeps_only_low_resolution_logits():
    logits = torch.randn(2, NUM_CLASSES, SIZE // 4, SIZE // 4, requires_grad=True)
    label = _labels()
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        resize_cross_entropy(logits, label)
    float_bytes = sum(t.numel() * t.element_size() for t in saved if t.is_floating_point())
    # No full-resolution score map survives forward: the logits, and one
    # log-sum-exp per full-resolution pixel (1/K of a score map).
    assert float_bytes == logits.numel() * 4 + label.numel() * 4
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        saved.clear()
        _mmseg_loss(logits, label, False, False)
    unfused = sum(t.numel() * t.element_size() for t in saved if t.is_floating_point())
    assert unfused >= 2 * NUM_CLASSES * SIZE * SIZE * 4  # log-probabilities at label size


def test_resize_cross_entropy_transient_memory_is_one_class_block(monkeypatch):
    # Forward and backward stream class blocks: what they allocate beyond the
    # inputs, outputs and saved tensors is a few blocks, not the (K, H, W)
    # score map of an image (mmseg's loss holds two maps of the whole batch).
    num_classes, classes_per_block = 150, 4  # ADE20K's classes
    monkeypatch.setattr(fused_losses, '_BLOCK_ELEMENTS', classes_per_block * SIZE * SIZE)
    torch.manual_seed(0)
    logits = torch.randn(2, num_classes, SIZE // 4, SIZE // 4, requires_grad=True)
    label = torch.randint(0, num_classes, (2, SIZE, SIZE))
    image_map = num_classes * SIZE * SIZE * 4  # one image's full-resolution scores
    with CPUAllocatorTrace() as trace:
        with trace.window('fused'):
            resize_cross_entropy(logits, label).backward()
        with trace.window('mmseg'):
            _mmseg_loss(logits, label, False, False).backward()
    start, peak = trace.levels('fused')
    grad_bytes = logits.numel() * 4  # the output of backward
    assert peak - start < grad_bytes + image_map / 4
    start, peak = trace.levels('mmseg')
    assert peak - start > 2 * image_map


def _loss_grad_and_saved_labels(logits, label, ignore_index):
    """Fused loss, its gradient, and the integer tensors it saved for backward."""
    saved = []

    def pack(t):
        if not t.is_floating_point():
            saved.append(t)
        return t

    x = logits.clone().requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = resize_cross_entropy(x, label, ignore_index=ignore_index)
    (grad,) = torch.autograd.grad(loss, x)
    return loss, grad, saved


@pytest.mark.parametrize('num_classes, ignore_index, stored', [
    (NUM_CLASSES, IGNORE, torch.uint8),
    (300, IGNORE, torch.int16),        # ADE20K-full's 847 classes: int16 too
    (NUM_CLASSES, -100, torch.int16),  # torch's default ignore_index is negative
])
def test_labels_saved_compact_with_loss_and_gradient_unchanged(monkeypatch, num_classes,
                                                               ignore_index, stored):
    torch.manual_seed(0)
    logits = torch.randn(2, num_classes, SIZE // 4, SIZE // 4)
    label = torch.randint(0, num_classes, (2, SIZE, SIZE))
    label[:, :5] = ignore_index
    loss, grad, saved = _loss_grad_and_saved_labels(logits, label, ignore_index)
    # one label tensor, ``stored.itemsize`` bytes per pixel (uint8: 1 instead of 8)
    assert [(t.dtype, t.shape) for t in saved] == [(stored, label.shape)]
    assert saved[0].untyped_storage().nbytes() == label.numel() * stored.itemsize
    # Bit for bit what saving the int64 labels themselves gave.
    monkeypatch.setattr(fused_losses, '_label_storage_dtype', lambda n, i, dtype: dtype)
    loss_int64, grad_int64, saved_int64 = _loss_grad_and_saved_labels(logits, label,
                                                                      ignore_index)
    assert [t.dtype for t in saved_int64] == [torch.int64]
    assert torch.equal(loss, loss_int64) and torch.equal(grad, grad_int64)
    # and torch's cross-entropy of the upsampled logits (mean over all pixels)
    x = logits.clone().requires_grad_()
    up = F.interpolate(x, size=label.shape[-2:], mode='bilinear', align_corners=False)
    ref = F.cross_entropy(up, label, ignore_index=ignore_index, reduction='sum') / (
        label.numel() + torch.finfo(torch.float32).eps)
    (ref_grad,) = torch.autograd.grad(ref, x)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-7)


# ---------------------------------------------------- 8-bit logits (under Mesa)
def _trained_logits(dtype=torch.float32):
    """Logits like a trained model's: wide per-pixel ranges, most pixels
    confident of their label, where the loss gradient is the sum of tiny
    softmax weights (what a saturating 8-bit range would get wrong)."""
    torch.manual_seed(3)
    label = _labels()
    low = F.interpolate(label[:, None].float(), size=(SIZE // 4, SIZE // 4),
                        mode='nearest')[:, 0].long()
    onehot = F.one_hot(torch.where(low == IGNORE, 0, low), NUM_CLASSES).permute(0, 3, 1, 2)
    logits = torch.randn(2, NUM_CLASSES, SIZE // 4, SIZE // 4) * 6 + 20 * onehot
    return logits.to(dtype), label


def _fused_grad(logits, label, logits_in_8bit):
    x = logits.clone().requires_grad_()
    loss, pred = resize_cross_entropy(x, label, ignore_index=IGNORE, return_pred=True,
                                      logits_in_8bit=logits_in_8bit)
    (grad,) = torch.autograd.grad(loss, x)
    return loss, pred, grad


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_8bit_logits_keep_loss_and_pred_exact_and_gradient_close(dtype):
    logits, label = _trained_logits(dtype)
    loss, pred, grad = _fused_grad(logits, label, False)
    loss8, pred8, grad8 = _fused_grad(logits, label, True)
    # The forward never sees the codes: loss and accuracy bit for bit.
    assert torch.equal(loss8, loss) and torch.equal(pred8, pred)
    assert grad8.dtype == grad.dtype == dtype
    # One range per pixel with its top score exact: a few 1e-3 of relative
    # error; a range that let the low scores saturate would be far off here.
    rel = ((grad8.double() - grad.double()).norm() / grad.double().norm()).item()
    assert 0 < rel < (0.02 if dtype == torch.float32 else 0.05)
    assert _cosine(grad8, grad) >= 0.9998


def _saved(logits, label, logits_in_8bit):
    saved = []

    def pack(t):
        saved.append(t)
        return t

    x = logits.clone().requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        resize_cross_entropy(x, label, ignore_index=IGNORE, logits_in_8bit=logits_in_8bit)
    return saved


def test_8bit_logits_save_codes_not_the_logits():
    logits, label = _trained_logits()
    exact, codes = _saved(logits, label, False), _saved(logits, label, True)
    nbytes = lambda ts: sum(t.untyped_storage().nbytes() for t in ts)  # noqa: E731
    assert any(t.shape == logits.shape and t.dtype == torch.float32 for t in exact)
    assert not any(t.is_floating_point() and t.shape == logits.shape for t in codes)
    q = [t for t in codes if t.dtype == torch.uint8 and t.numel() == logits.numel()]
    assert len(q) == 1  # labels are uint8 too, at full resolution
    # fp32 logits (4 bytes each) became codes (1 byte) plus two floats a pixel
    pixels = logits.numel() // NUM_CLASSES
    assert nbytes(exact) - nbytes(codes) == 3 * logits.numel() - 2 * 4 * pixels


def test_audit_counts_the_loss_codes_as_compressed_and_its_lse_not():
    logits, label = _trained_logits()
    conv = torch.nn.Conv2d(NUM_CLASSES, NUM_CLASSES, 1)
    records = audit_saved_tensors(conv, forward_fn=lambda: resize_cross_entropy(
        conv(logits), label, ignore_index=IGNORE, logits_in_8bit=True))
    compressed = sorted((r.dtype, r.shape) for r in records if r.compressed)
    pixels = (SIZE // 4) ** 2
    assert compressed == [('float32', (2, pixels)), ('float32', (2, pixels)),
                          ('uint8', (2, NUM_CLASSES, pixels, 1))]
    # the conv's fp32 input, the labels and the full-resolution log-sum-exp
    assert sorted((r.dtype, r.shape) for r in records if not r.compressed) == [
        ('float32', tuple(logits.shape)), ('float32', (2, SIZE, SIZE)),
        ('uint8', (2, SIZE, SIZE))]


def test_accuracy_from_pred_matches_mmseg_accuracy():
    torch.manual_seed(1)
    scores = torch.randn(2, NUM_CLASSES, SIZE, SIZE)
    label = _labels()
    expected = accuracy(scores, label, ignore_index=IGNORE)
    torch.testing.assert_close(_accuracy_from_pred(scores.argmax(1), label, IGNORE), expected)


# ------------------------------------------------------------------ segmentor
def _segmentor_cfg(mesa=None, fused_loss=True, norm='BN', aux_loss=None):
    norm_cfg = dict(type=norm, requires_grad=True)
    return dict(
        type='MesaEncoderDecoder', mesa=mesa, fused_loss=fused_loss,
        data_preprocessor=dict(type='SegDataPreProcessor', mean=[123.675, 116.28, 103.53],
                               std=[58.395, 57.12, 57.375], bgr_to_rgb=True, pad_val=0,
                               seg_pad_val=IGNORE, size=(SIZE, SIZE)),
        backbone=dict(type='SwinTransformer', embed_dims=32, depths=[1, 1, 1, 1],
                      num_heads=[1, 2, 4, 8], window_size=4, drop_path_rate=0.0),
        decode_head=dict(type='UPerHead', in_channels=[32, 64, 128, 256], in_index=[0, 1, 2, 3],
                         pool_scales=(1, 2, 3, 6), channels=32, dropout_ratio=0.0,
                         num_classes=NUM_CLASSES, norm_cfg=norm_cfg, align_corners=False,
                         loss_decode=dict(type='CrossEntropyLoss', loss_weight=1.0)),
        auxiliary_head=dict(type='FCNHead', in_channels=128, in_index=2, channels=16,
                            num_convs=1, concat_input=False, dropout_ratio=0.0,
                            num_classes=NUM_CLASSES, norm_cfg=norm_cfg, align_corners=False,
                            loss_decode=aux_loss or dict(type='CrossEntropyLoss',
                                                         loss_weight=0.4)),
        train_cfg=dict(), test_cfg=dict(mode='whole'))


def _batch(batch=2):
    torch.manual_seed(2)
    imgs = torch.randn(batch, 3, SIZE, SIZE)
    samples = []
    for label in _labels(batch):
        sample = SegDataSample()
        sample.gt_sem_seg = PixelData(data=label[None])
        sample.set_metainfo(dict(img_shape=(SIZE, SIZE), pad_shape=(SIZE, SIZE)))
        samples.append(sample)
    return imgs, samples


def _loss_and_grads(model, imgs, samples):
    model.train()
    model.zero_grad()
    losses = model.loss(imgs, samples)
    total = sum(v for k, v in losses.items() if 'loss' in k)
    total.backward()
    return losses, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_mesa_none_is_plain_encoder_decoder():
    model = MODELS.build(_segmentor_cfg(mesa=None, fused_loss=False))
    assert not any(isinstance(m, MesaModule) for m in model.modules())
    plain_cfg = _segmentor_cfg()
    del plain_cfg['mesa'], plain_cfg['fused_loss']
    plain = MODELS.build(dict(plain_cfg, type='EncoderDecoder'))
    assert model.state_dict().keys() == plain.state_dict().keys()


def test_mesa_heads_match_fp32_losses_and_gradients():
    torch.manual_seed(0)
    ref = MODELS.build(_segmentor_cfg(mesa=None, fused_loss=False))
    mesa = MODELS.build(_segmentor_cfg(mesa=dict(groups='channels'), fused_loss=True))
    missing, unexpected = mesa.load_state_dict(ref.state_dict(), strict=True)
    assert not missing and not unexpected  # an FP32 checkpoint loads strictly
    # The backbone is untouched (it has its own policy); neck/heads are converted.
    assert not any(isinstance(m, MesaModule) for m in mesa.backbone.modules())
    assert isinstance(mesa.decode_head.fpn_bottleneck.conv, MesaConv2d)
    assert isinstance(mesa.decode_head.fpn_bottleneck.bn, MesaBatchNorm2d)
    assert isinstance(mesa.auxiliary_head.convs[0].conv, MesaConv2d)

    imgs, samples = _batch()
    ref_losses, ref_grads = _loss_and_grads(ref, imgs, samples)
    mesa_losses, mesa_grads = _loss_and_grads(mesa, imgs, samples)
    assert ref_losses.keys() == mesa_losses.keys()
    for key in ref_losses:  # forward is exact; fused CE differs by summation order only
        torch.testing.assert_close(mesa_losses[key], ref_losses[key], rtol=1e-5, atol=1e-5)
    flat = lambda g: torch.cat([g[k].flatten() for k in sorted(ref_grads)])  # noqa: E731
    assert mesa_grads.keys() == ref_grads.keys()
    assert _cosine(flat(mesa_grads), flat(ref_grads)) >= 0.995
    for part in ('backbone', 'decode_head', 'auxiliary_head'):
        part_ref = torch.cat([v.flatten() for k, v in ref_grads.items() if k.startswith(part)])
        part_mesa = torch.cat([v.flatten() for k, v in mesa_grads.items() if k.startswith(part)])
        assert _cosine(part_mesa, part_ref) >= 0.995, part


@pytest.mark.parametrize('mesa, mesa_loss, in_8bit', [
    (dict(groups='channels'), True, True),
    (dict(groups='channels'), False, False),
    (None, True, False),
    (dict(enabled=False), True, False),
])
def test_fused_loss_keeps_logits_in_8bit_only_under_mesa(mesa, mesa_loss, in_8bit):
    model = MODELS.build(dict(_segmentor_cfg(mesa=mesa), mesa_loss=mesa_loss))
    assert model.decode_head.logits_in_8bit is model.auxiliary_head.logits_in_8bit is in_8bit
    imgs, samples = _batch()
    records = audit_saved_tensors(model, forward_fn=lambda: model.loss(imgs, samples))
    # per head: (batch, classes, pixels, 1) codes, UPerHead's at 1/4, FCNHead's at 1/16
    codes = [r.shape for r in records if r.dtype == 'uint8' and len(r.shape) == 4
             and r.shape[1] == NUM_CLASSES and r.shape[-1] == 1]
    assert codes == ([(2, NUM_CLASSES, (SIZE // 4) ** 2, 1),
                      (2, NUM_CLASSES, (SIZE // 16) ** 2, 1)] if in_8bit else [])


def test_every_auxiliary_head_of_a_list_gets_the_fused_8bit_loss():
    # mmseg builds a list of auxiliary heads as an nn.ModuleList
    cfg = _segmentor_cfg(mesa=dict(groups='channels'))
    aux = cfg['auxiliary_head']
    cfg['auxiliary_head'] = [aux, dict(aux, in_index=3, in_channels=256)]
    model = MODELS.build(cfg)
    assert [type(h).__name__ for h in model.auxiliary_head] == ['FusedLossFCNHead'] * 2
    assert all(h.logits_in_8bit for h in model.auxiliary_head)
    assert _loss_label(model) == LOSS_FUSED_8BIT
    aux_0, aux_1 = model.auxiliary_head
    aux_1.logits_in_8bit = False  # the report then names each head's loss
    assert _loss_label(model) == (f'decode head: {LOSS_FUSED_8BIT}; '
                                  f'auxiliary head 0: {LOSS_FUSED_8BIT}; '
                                  f'auxiliary head 1: {LOSS_FUSED}')
    model.auxiliary_head = model.auxiliary_head[1]
    assert _loss_label(model) == f'decode head: {LOSS_FUSED_8BIT}; auxiliary head: {LOSS_FUSED}'
    model.auxiliary_head = nn.ModuleList([aux_0, aux_1])
    losses, _ = _loss_and_grads(model, *_batch())
    assert {'aux_0.loss_ce', 'aux_1.loss_ce'} <= losses.keys()


def test_mesa_heads_reduce_saved_bytes():
    imgs, samples = _batch()
    totals = {}
    for name, mesa in (('fp32', None), ('mesa', dict(groups='channels'))):
        torch.manual_seed(0)
        model = MODELS.build(_segmentor_cfg(mesa=mesa, fused_loss=mesa is not None))
        records = audit_saved_tensors(
            model, forward_fn=lambda m=model: sum(
                v for k, v in m.loss(imgs, samples).items() if 'loss' in k))
        totals[name] = sum(r.nbytes for r in records if not r.module.startswith('backbone'))
    # Heads + losses: uint8 inputs, 1-bit ReLU masks, low-resolution logits only.
    assert totals['mesa'] <= 0.3 * totals['fp32'], totals


def test_unsupported_loss_keeps_mmseg_path(caplog):
    model = MODELS.build(_segmentor_cfg(
        mesa=dict(groups='channels'),
        aux_loss=[dict(type='CrossEntropyLoss', loss_weight=0.4),
                  dict(type='DiceLoss', loss_weight=0.4)]))
    assert type(model.decode_head).__name__ == 'FusedLossStoreOnceUPerHead'
    assert type(model.auxiliary_head).__name__ == 'FCNHead'
    imgs, samples = _batch()
    losses, _ = _loss_and_grads(model, imgs, samples)
    assert torch.isfinite(losses['aux.loss_ce']) and torch.isfinite(losses['aux.loss_dice'])


def test_head_policy_defaults_per_channel_widened_ranges():
    model = MODELS.build(_segmentor_cfg(mesa=dict()))
    convs = [m for m in model.decode_head.modules() if isinstance(m, MesaConv2d)]
    assert convs
    for conv in convs:
        assert conv.quantizer.config.widen_to_batch and conv.quantizer.groups == conv.in_channels
    # Options given in the config update the defaults.
    model = MODELS.build(_segmentor_cfg(mesa=dict(widen_to_batch=False, groups=1)))
    assert not any(m.quantizer.config.widen_to_batch or m.quantizer.groups != 1
                   for m in model.decode_head.modules() if isinstance(m, MesaConv2d))


def test_fused_head_state_dict_and_deepcopy():
    model = MODELS.build(_segmentor_cfg(mesa=dict(groups='channels')))
    clone = copy.deepcopy(model)
    assert type(clone.decode_head) is type(model.decode_head)
    assert clone.state_dict().keys() == model.state_dict().keys()


def test_syncbn_becomes_mesa_bn_in_a_single_process():
    model = MODELS.build(_segmentor_cfg(mesa=dict(groups='channels'), norm='SyncBN'))
    bns = [m for m in model.decode_head.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert bns and all(type(m) is MesaBatchNorm2d for m in bns)


def test_syncbn_becomes_mesa_sync_bn_in_a_distributed_run(monkeypatch):
    from mesa_seg.models import segmentors
    monkeypatch.setattr(segmentors, 'is_distributed', lambda: True)
    logs = []
    monkeypatch.setattr(segmentors, 'print_log', lambda msg, **kw: logs.append(msg))
    plain = MODELS.build(_segmentor_cfg(mesa=None, fused_loss=False, norm='SyncBN'))
    plain_bns = [m for m in plain.decode_head.modules()
                 if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    # mmcv's SyncBN is mmengine's subclass of torch's, not torch's class itself
    assert plain_bns and all(isinstance(m, torch.nn.SyncBatchNorm)
                             and type(m) is not torch.nn.SyncBatchNorm for m in plain_bns)
    model = MODELS.build(_segmentor_cfg(mesa=dict(groups='channels'), norm='SyncBN'))
    bns = [m for part in (model.decode_head, model.auxiliary_head) for m in part.modules()
           if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert bns and all(type(m) is MesaSyncBatchNorm for m in bns)
    assert all(m.quantizer.groups == m.num_features for m in bns)
    weights = {k for k in model.state_dict() if k.rsplit('.', 2)[-2] not in QUANTIZER_ATTRS}
    assert weights == set(plain.state_dict())
    assert not logs
    # a head policy that leaves them out says so
    MODELS.build(_segmentor_cfg(mesa=dict(layers=['Conv2d', 'ReLU']), norm='SyncBN'))
    assert any('SyncBatchNorm layer(s) of the neck/heads stay in full precision' in m
               for m in logs)


def test_bad_mesa_option_in_segmentor_is_a_clear_error():
    with pytest.raises(ValueError, match='unknown option'):
        MODELS.build(_segmentor_cfg(mesa=dict(group=4)))


def test_heads_with_their_own_loss_keep_it(monkeypatch):
    """EncHead (SE loss) and DAHead (PAM/CAM losses) define their own
    loss_by_feat/loss: the fused loss would drop their extra terms."""
    from mesa_seg.models import segmentors
    logs = []
    monkeypatch.setattr(segmentors, 'print_log', lambda msg, **kw: logs.append(msg))
    norm_cfg = dict(type='BN', requires_grad=True)
    cfg = _segmentor_cfg(mesa=dict(groups='channels'))
    cfg['decode_head'] = dict(
        type='EncHead', in_channels=[32, 64, 128, 256], in_index=[0, 1, 2, 3], channels=32,
        num_codes=8, use_se_loss=True, add_lateral=False, dropout_ratio=0.0,
        num_classes=NUM_CLASSES, norm_cfg=norm_cfg, align_corners=False,
        loss_decode=dict(type='CrossEntropyLoss', loss_weight=1.0),
        loss_se_decode=dict(type='CrossEntropyLoss', use_sigmoid=True, loss_weight=0.2))
    cfg['auxiliary_head'] = dict(
        type='DAHead', in_channels=128, in_index=2, channels=16, pam_channels=8,
        dropout_ratio=0.0, num_classes=NUM_CLASSES, norm_cfg=norm_cfg, align_corners=False,
        loss_decode=dict(type='CrossEntropyLoss', loss_weight=0.4))
    model = MODELS.build(cfg)
    assert type(model.decode_head).__name__ == 'EncHead'
    assert type(model.auxiliary_head).__name__ == 'DAHead'
    assert 'Mesa: EncHead keeps the unfused loss: EncHead defines its own loss_by_feat' in logs
    assert 'Mesa: DAHead keeps the unfused loss: DAHead defines its own loss_by_feat' in logs
    from mesa_seg.mesa import use_backend
    with use_backend('eager'):  # no kernel compilation for these shapes
        losses, _ = _loss_and_grads(model, *_batch())
    for key in ('decode.loss_ce', 'decode.loss_se', 'aux.pam_cam.loss_ce', 'aux.pam.loss_ce',
                'aux.cam.loss_ce'):
        assert torch.isfinite(losses[key]), key
    # a stock head next to them still gets the fused loss
    cfg['auxiliary_head'] = _segmentor_cfg()['auxiliary_head']
    assert type(MODELS.build(cfg).auxiliary_head).__name__ == 'FusedLossFCNHead'


def test_resize_cross_entropy_rejects_labels_outside_the_classes(monkeypatch):
    # Class blocks clamp the label index inside each block; an out-of-range
    # label must still fail loudly (torch's cross-entropy raises too).
    monkeypatch.setattr(fused_losses, '_BLOCK_ELEMENTS', 2 * SIZE * SIZE)
    logits = torch.randn(2, NUM_CLASSES, SIZE // 4, SIZE // 4, requires_grad=True)
    label = _labels()
    label[1, -1, -1] = NUM_CLASSES
    with pytest.raises(IndexError, match='outside'):
        resize_cross_entropy(logits, label)
