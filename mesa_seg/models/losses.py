"""Exact, memory-light segmentation loss: fused "resize + cross-entropy".

mmseg upsamples the ¼-resolution logits to label size, then ``F.cross_entropy``
saves the full-resolution log-probabilities for backward: for ADE20K (150
classes, 512², batch 2) that is 300 MB per head, more than the whole Mesa
backbone keeps. :func:`resize_cross_entropy` keeps only the low-resolution
logits and, in backward, recomputes upsampling + log-softmax one image at a
time. Nothing is quantized: loss and gradients equal mmseg's up to float
summation order, and the transient full-resolution tensors of backward are
1/B of the unfused ones. The full-resolution labels it keeps for backward are
stored in the smallest integer type that holds every class and the ignore
index (uint8 for up to 255 classes with ignore_index 255): 1 byte per pixel
instead of int64's 8.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch.autograd import Function

__all__ = ['resize_cross_entropy', 'fused_loss_supported', 'FusedLossHeadMixin']


def _upsample_classes_last(logits_i: torch.Tensor, size: Tuple[int, int],
                           align_corners: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """Upsample one image's ``(1, K, h, w)`` logits; also return them as
    ``(1, H, W, K)``, classes innermost in memory.

    Softmax, the label gather and argmax all reduce over classes: with classes
    innermost they stream memory. On a ``(1, K, H, W)`` contiguous tensor they
    stride by ``H*W``, and torch's log-softmax copies a channels-last input to
    contiguous first (a third of the loss's time at 512² before this).
    """
    up = F.interpolate(logits_i.contiguous(memory_format=torch.channels_last), size=size,
                       mode='bilinear', align_corners=align_corners)
    return up, up.permute(0, 2, 3, 1)


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


def _valid_and_index(label_i: torch.Tensor, ignore_index: int):
    valid = label_i != ignore_index
    return valid, torch.where(valid, label_i, 0).unsqueeze(-1)


class _ResizeCrossEntropy(Function):
    @staticmethod
    def forward(ctx, logits, label, align_corners, ignore_index, avg_factor, with_pred):
        size = tuple(label.shape[-2:])
        total, preds = 0.0, []
        with torch.no_grad():
            for i in range(logits.shape[0]):
                _, z = _upsample_classes_last(logits[i:i + 1], size, align_corners)
                valid, index = _valid_and_index(label[i:i + 1], ignore_index)
                # -log_softmax at the label, summed over non-ignored pixels: mmseg's
                # cross-entropy (no class weights, mean reduction) before averaging.
                nll = -z.log_softmax(-1).gather(-1, index).squeeze(-1)
                total = total + torch.where(valid, nll, 0.0).sum()
                preds.append(z.argmax(-1) if with_pred else None)
        # Valid labels only got here (gather checks its indices): narrowing is exact.
        stored = label.to(_label_storage_dtype(logits.shape[1], ignore_index, label.dtype))
        ctx.save_for_backward(logits, stored)
        ctx.meta = (size, align_corners, ignore_index, avg_factor, label.dtype)
        # The predictions come from the same upsampled logits (accuracy needs no
        # second upsampling pass); they carry no gradient.
        pred = torch.cat(preds) if with_pred else label.new_empty(0)
        ctx.mark_non_differentiable(pred)
        return total / avg_factor, pred

    @staticmethod
    def backward(ctx, grad, _grad_pred):
        logits, stored = ctx.saved_tensors
        size, align_corners, ignore_index, avg_factor, label_dtype = ctx.meta
        grad_logits = torch.empty_like(logits)
        for i in range(logits.shape[0]):
            with torch.enable_grad():
                li = logits[i:i + 1].detach().requires_grad_()
                up, z = _upsample_classes_last(li, size, align_corners)
            with torch.no_grad():
                # d(-log_softmax[label]) / dz = softmax - onehot(label), zero where
                # ignored: one softmax pass instead of re-running the loss graph.
                # One image's labels widened back at a time (gather wants int64).
                label_i = stored[i:i + 1].to(label_dtype)
                valid, index = _valid_and_index(label_i, ignore_index)
                g = z.softmax(-1)
                g.scatter_add_(-1, index, torch.full_like(index, -1, dtype=g.dtype))
                g.mul_((valid * (grad / avg_factor)).unsqueeze(-1).to(g.dtype))
            (grad_logits[i:i + 1],) = torch.autograd.grad(up, li, g.permute(0, 3, 1, 2))
        return grad_logits, None, None, None, None, None


def resize_cross_entropy(logits: torch.Tensor, label: torch.Tensor, align_corners: bool = False,
                         ignore_index: int = 255, avg_non_ignore: bool = False,
                         return_pred: bool = False):
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
                                           avg_factor, return_pred)
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
    """Replaces a decode head's ``loss_by_feat`` with the fused, exact version.

    Same loss names and values (``loss_ce``, ``acc_seg``) as mmseg's
    ``BaseDecodeHead.loss_by_feat`` for plain cross-entropy losses.
    """

    def loss_by_feat(self, seg_logits, batch_data_samples) -> dict:
        seg_label = self._stack_batch_gt(batch_data_samples).squeeze(1)
        losses = self.loss_decode if isinstance(self.loss_decode, torch.nn.ModuleList) \
            else [self.loss_decode]
        loss, pred = dict(), None
        for loss_decode in losses:
            value = resize_cross_entropy(seg_logits, seg_label, self.align_corners,
                                         self.ignore_index, loss_decode.avg_non_ignore,
                                         return_pred=pred is None)
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
