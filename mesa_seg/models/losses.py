"""Exact, memory-light segmentation loss: fused "resize + cross-entropy"
(under Mesa with 8-bit logits for backward).

mmseg upsamples the ¼-resolution logits to label size, then ``F.cross_entropy``
saves the full-resolution log-probabilities for backward: for ADE20K (150
classes, 512², batch 2) that is 300 MB per head, more than the whole Mesa
backbone keeps. :func:`resize_cross_entropy` keeps only the low-resolution
logits and the per-pixel log-sum-exp, and streams the full-resolution scores
in blocks of classes (bilinear upsampling treats classes independently): forward
keeps an online log-sum-exp, the label's score and the argmax; backward
recomputes one block's upsampled scores, turns them into ``softmax - onehot`` and
applies the adjoint of the upsampling. Loss and gradients equal mmseg's up to
float summation order, and what either pass allocates at a time is one block
(16 MiB) instead of an image's score map (150 MiB, twice). The full-resolution
labels it keeps for backward are stored in the smallest integer type that
holds every class and the ignore index (uint8 for up to 255 classes with
ignore_index 255): 1 byte per pixel instead of int64's 8.

With ``logits_in_8bit`` (Mesa on the heads, :class:`MesaEncoderDecoder`) the
logits are kept as Mesa keeps activations: 8-bit codes, one range per pixel
(its scores' min to max, so the top score is exact;
:func:`~mesa_seg.mesa.quantizer.pack_softmax_input`);
at 512², batch 2, 150 classes that is 20 MiB of fp32 logits down to 5 MiB. The
loss, accuracy and forward stay exact; the gradient is computed from the
dequantized logits (and the exact log-sum-exp), like every Mesa layer's.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch.autograd import Function

from ..mesa.audit import mark_compressed
from ..mesa.primitives import dequantize
from ..mesa.quantizer import pack_softmax_input

__all__ = ['resize_cross_entropy', 'fused_loss_supported', 'FusedLossHeadMixin']


#: Full-resolution scores handled at once: a block of classes of one image, about
#: 16 MiB in fp32. The whole ``(K, H, W)`` map of one image is 150 MiB for
#: ADE20K at 512², and forward and backward each held two of them.
_BLOCK_ELEMENTS = 1 << 22


def _class_blocks(num_classes: int, pixels: int):
    """``(start, stop)`` class ranges, each ``_BLOCK_ELEMENTS`` scores or fewer."""
    step = max(1, min(num_classes, _BLOCK_ELEMENTS // max(pixels, 1)))
    return [(c, min(c + step, num_classes)) for c in range(0, num_classes, step)]


def _upsample(logits_block: torch.Tensor, size: Tuple[int, int], align_corners: bool):
    """mmseg's ``resize`` of a ``(1, k, h, w)`` block, as float32 for the reductions.

    Bilinear interpolation treats every class on its own: a block of classes
    gives exactly the rows of the whole map.
    """
    up = F.interpolate(logits_block, size=size, mode='bilinear', align_corners=align_corners)
    return up.float()


#: Candidates for the stored labels, smallest first.
_LABEL_DTYPES = (torch.uint8, torch.int16, torch.int32)


def _label_storage_dtype(num_classes: int, ignore_index: int,
                         dtype: torch.dtype) -> torch.dtype:
    """The smallest integer dtype holding ``0 .. num_classes - 1`` and
    ``ignore_index`` (``dtype`` itself if none is smaller). The forward's gather
    rejects any other label value, so the round trip is exact."""
    low, high = min(0, ignore_index), max(num_classes - 1, ignore_index)
    for candidate in _LABEL_DTYPES:
        info = torch.iinfo(candidate)
        if info.min <= low and high <= info.max and candidate.itemsize < dtype.itemsize:
            return candidate
    return dtype


def _block_index(index: torch.Tensor, start: int, stop: int):
    """Where the label falls in classes ``start:stop``, and its offset there."""
    inside = (index >= start) & (index < stop)
    return inside, (index - start).clamp_(0, stop - start - 1)


def _image_forward(logits_i, label_i, size, align_corners, ignore_index, with_pred):
    """One image: per-pixel log-sum-exp, the label's score and the argmax, streamed
    over class blocks (an online log-sum-exp, as in flash attention)."""
    valid = label_i != ignore_index
    index = torch.where(valid, label_i, 0).unsqueeze(1)  # (1, 1, H, W)
    if bool(((index < 0) | (index >= logits_i.shape[1])).any()):
        # torch's cross-entropy raises here too; a gather would not, block by block.
        raise IndexError(f'label values outside [0, {logits_i.shape[1]}) '
                         f'and not ignore_index={ignore_index}')
    running_max = running_sum = picked = pred = None
    for start, stop in _class_blocks(logits_i.shape[1], size[0] * size[1]):
        up = _upsample(logits_i[:, start:stop], size, align_corners)
        inside, offset = _block_index(index, start, stop)
        score = torch.where(inside, up.gather(1, offset), 0.0)
        block_max, block_arg = up.max(1, keepdim=True)
        if running_max is None:
            running_max, picked, pred = block_max, score, block_arg
            running_sum = up.sub_(block_max).exp_().sum(1, keepdim=True)
            continue
        picked = picked + score
        if with_pred:  # strictly greater: ties keep the first class, as argmax
            pred = torch.where(block_max > running_max, block_arg + start, pred)
        new_max = torch.maximum(running_max, block_max)
        running_sum = running_sum.mul_((running_max - new_max).exp_()).add_(
            up.sub_(new_max).exp_().sum(1, keepdim=True))
        running_max = new_max
    lse = running_max.add_(running_sum.log_())
    nll = torch.where(valid.unsqueeze(1), lse - picked, 0.0)
    return nll.sum(), lse.squeeze(1), pred.squeeze(1) if with_pred else None


class _ResizeCrossEntropy(Function):
    @staticmethod
    def forward(ctx, logits, label, align_corners, ignore_index, avg_factor, with_pred,
                logits_in_8bit):
        size = tuple(label.shape[-2:])
        total, lses, preds = 0.0, [], []
        with torch.no_grad():
            for i in range(logits.shape[0]):
                # -log_softmax at the label, summed over non-ignored pixels: mmseg's
                # cross-entropy (no class weights, mean reduction) before averaging.
                nll, lse, pred = _image_forward(logits[i:i + 1], label[i:i + 1], size,
                                                align_corners, ignore_index, with_pred)
                total = total + nll
                lses.append(lse)
                preds.append(pred)
        # Valid labels only got here (checked above): narrowing is exact.
        stored = label.to(_label_storage_dtype(logits.shape[1], ignore_index, label.dtype))
        # The log-sum-exp (one float per pixel, 1/K of the scores) spares backward
        # a second pass over the classes.
        ctx.save_for_backward(stored, torch.cat(lses), *_kept_logits(logits, logits_in_8bit))
        ctx.meta = (size, align_corners, ignore_index, avg_factor, label.dtype, logits.shape,
                    logits.dtype)
        # The predictions come from the same upsampled logits (accuracy needs no
        # second upsampling pass); they carry no gradient.
        pred = torch.cat(preds) if with_pred else label.new_empty(0)
        ctx.mark_non_differentiable(pred)
        return total / avg_factor, pred

    @staticmethod
    def backward(ctx, grad, _grad_pred):
        stored, lse, *kept = ctx.saved_tensors
        size, align_corners, ignore_index, avg_factor, label_dtype, shape, dtype = ctx.meta
        grad_logits = torch.empty(shape, dtype=dtype, device=lse.device)
        for i in range(shape[0]):
            # d(-log_softmax[label]) / dz = softmax - onehot(label), zero where
            # ignored, scaled by the incoming gradient; then the adjoint of the
            # upsampling, one class block at a time (classes are independent).
            label_i = stored[i:i + 1].to(label_dtype)  # gather wants int64
            valid = label_i != ignore_index
            index = torch.where(valid, label_i, 0).unsqueeze(1)
            weight = (valid * (grad / avg_factor)).unsqueeze(1).float()
            lse_i = lse[i:i + 1].unsqueeze(1)
            for start, stop in _class_blocks(shape[1], size[0] * size[1]):
                block = _logits_block(kept, i, start, stop, shape, dtype)
                g = _upsample(block, size, align_corners).sub_(lse_i).exp_().mul_(weight)
                inside, offset = _block_index(index, start, stop)
                g.scatter_add_(1, offset, torch.where(inside, -weight, 0.0))
                grad_logits[i:i + 1, start:stop] = torch.ops.aten.upsample_bilinear2d_backward(
                    g.to(dtype), list(size), list(block.shape), align_corners)
        return grad_logits, None, None, None, None, None, None


def _kept_logits(logits: torch.Tensor, in_8bit: bool) -> Tuple[torch.Tensor, ...]:
    """What backward keeps of the logits: the tensor, or per image 8-bit codes
    ``(K, h*w, 1)`` with per-pixel ranges, stacked over the batch."""
    if not in_8bit:
        return (logits,)
    kept = tuple(torch.stack(parts) for parts in
                 zip(*(pack_softmax_input(image) for image in logits)))
    mark_compressed(*kept)
    return kept


def _logits_block(kept, i: int, start: int, stop: int, shape, dtype) -> torch.Tensor:
    """Classes ``start:stop`` of image ``i`` as a ``(1, k, h, w)`` tensor."""
    if len(kept) == 1:
        return kept[0][i:i + 1, start:stop]
    codes, lo, rng = (t[i] for t in kept)
    # Codes are grouped by pixel along dim 1: a class slice keeps the ranges.
    return dequantize(codes[start:stop], lo, rng, dtype).view(1, stop - start, *shape[2:])


def resize_cross_entropy(logits: torch.Tensor, label: torch.Tensor, align_corners: bool = False,
                         ignore_index: int = 255, avg_non_ignore: bool = False,
                         return_pred: bool = False, logits_in_8bit: bool = False):
    """``mean(CE(bilinear_resize(logits, label.shape), label))`` as mmseg computes it.

    Args:
        logits (Tensor): ``(B, K, h, w)`` low-resolution class scores.
        label (Tensor): ``(B, H, W)`` int64 labels.
        align_corners (bool): as the head's ``align_corners``. Default: False.
        ignore_index (int): label ignored (zero loss, zero gradient). Default: 255.
        avg_non_ignore (bool): average over non-ignored pixels (else over all,
            mmseg's default). Default: False.
        return_pred (bool): also return the ``(B, H, W)`` argmax of the
            upsampled logits (for accuracy). Default: False.
        logits_in_8bit (bool): keep the logits for backward as Mesa's 8-bit
            codes (see the module docstring): the loss and ``pred`` are
            unchanged, the gradient approximate. Default: False.

    Returns:
        Tensor: scalar loss; ``(loss, pred)`` with ``return_pred``.
    """
    if avg_non_ignore:
        avg_factor = float(label.numel() - (label == ignore_index).sum().item())
    else:
        avg_factor = float(label.numel())
    # As mmseg's weight_reduce_loss: sum / (avg_factor + eps).
    avg_factor += torch.finfo(torch.float32).eps
    loss, pred = _ResizeCrossEntropy.apply(logits, label, align_corners, ignore_index,
                                           avg_factor, return_pred, logits_in_8bit)
    return (loss, pred) if return_pred else loss


def fused_loss_supported(head) -> Optional[str]:
    """None if ``head``'s losses can use :func:`resize_cross_entropy`, else why not.

    Only heads that compute their loss on mmseg's stock path qualify:
    ``BaseDecodeHead.loss`` calling ``BaseDecodeHead.loss_by_feat``. Heads that
    define their own (EncHead's SE loss, DAHead's three PAM/CAM losses,
    STDCHead's boundary loss, PointHead's point losses) keep it.
    """
    from mmseg.models.decode_heads.decode_head import BaseDecodeHead
    from mmseg.models.losses import CrossEntropyLoss
    cls = type(head)
    for name in ('loss_by_feat', 'loss'):
        if getattr(cls, name, None) is not getattr(BaseDecodeHead, name):
            owner = next(c for c in cls.__mro__ if name in vars(c))
            return f'{owner.__name__} defines its own {name}'
    losses = head.loss_decode if isinstance(head.loss_decode, torch.nn.ModuleList) \
        else [head.loss_decode]
    if head.sampler is not None:
        return 'a pixel sampler is configured'
    for loss in losses:
        if type(loss) is not CrossEntropyLoss:
            return f'{type(loss).__name__} is not CrossEntropyLoss'
        if loss.use_sigmoid or loss.use_mask or loss.class_weight is not None \
                or loss.reduction != 'mean':
            return (f'{loss.loss_name} uses sigmoid/mask/class_weight/non-mean reduction')
    return None


class FusedLossHeadMixin:
    """Replaces a decode head's ``loss_by_feat`` with the fused one.

    Same loss names and values (``loss_ce``, ``acc_seg``) as mmseg's
    ``BaseDecodeHead.loss_by_feat`` for plain cross-entropy losses. A head
    whose ``logits_in_8bit`` is True (set by :class:`MesaEncoderDecoder` when
    Mesa is on) keeps its logits for backward in 8 bits.
    """

    logits_in_8bit = False

    def loss_by_feat(self, seg_logits, batch_data_samples) -> dict:
        seg_label = self._stack_batch_gt(batch_data_samples).squeeze(1)
        losses = self.loss_decode if isinstance(self.loss_decode, torch.nn.ModuleList) \
            else [self.loss_decode]
        loss, pred = dict(), None
        for loss_decode in losses:
            value = resize_cross_entropy(seg_logits, seg_label, self.align_corners,
                                         self.ignore_index, loss_decode.avg_non_ignore,
                                         return_pred=pred is None,
                                         logits_in_8bit=self.logits_in_8bit)
            if pred is None:
                value, pred = value
            value = loss_decode.loss_weight * value
            name = loss_decode.loss_name
            loss[name] = loss[name] + value if name in loss else value
        loss['acc_seg'] = _accuracy_from_pred(pred, seg_label, self.ignore_index)
        return loss


def _accuracy_from_pred(pred: torch.Tensor, label: torch.Tensor, ignore_index: int):
    """mmseg's top-1 ``accuracy`` (percent of non-ignored pixels, same eps) from
    predicted labels instead of full-resolution scores."""
    eps = torch.finfo(torch.float32).eps
    valid = label != ignore_index
    correct = ((pred == label) & valid).sum().float().reshape(1) + eps
    return correct.mul_(100.0 / (int(valid.sum()) + eps))
