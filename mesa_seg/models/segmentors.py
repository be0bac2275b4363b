"""``MesaEncoderDecoder``: Mesa for the neck and decode heads, set from the config.

The backbone carries its own ``mesa`` policy (``MesaSwinTransformer``,
``MesaPVT``...). This segmentor applies a second policy to everything after
it — neck, decode head, auxiliary heads (their Conv2d/BN/ReLU hold about as
much activation memory as a Swin-T backbone) — and, with ``fused_loss``,
computes the losses with the exact low-memory :func:`resize_cross_entropy`.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch.distributed as dist
from mmengine.logging import print_log
from mmseg.models.segmentors import EncoderDecoder
from mmseg.registry import MODELS
from torch import nn

from ..mesa import MesaPolicy, mesafy_
from ..resilience import check_finite_loss
from .losses import FusedLossHeadMixin, fused_loss_supported

__all__ = ['MesaEncoderDecoder', 'HEAD_MESA_DEFAULTS']

# Conv heads: per-channel ranges (BatchNorm's per-channel statistics over few
# pixels, e.g. pooled 1x1 maps, need them), widened to cover each batch: heads
# trained from scratch outgrow the running range. In the README's demo
# comparison, clipped heads ended at 55.4 mIoU (FP32 67.3); widened, 68.9 (FP32 66.2).
HEAD_MESA_DEFAULTS = dict(groups='channels', widen_to_batch=True)

_FUSED_CLASSES: Dict[type, type] = {}


def _with_fused_loss(head: nn.Module) -> None:
    """Give ``head`` the fused ``loss_by_feat`` (a subclass: same state_dict)."""
    cls = type(head)
    if cls not in _FUSED_CLASSES:
        fused = type(f'FusedLoss{cls.__name__}', (FusedLossHeadMixin, cls), {})
        fused.__module__ = __name__
        globals()[fused.__name__] = fused  # picklable by reference
        _FUSED_CLASSES[cls] = fused
    head.__class__ = _FUSED_CLASSES[cls]


def _sync_bn_to_bn(module: nn.Module) -> nn.Module:
    """``SyncBatchNorm`` -> ``BatchNorm2d`` (same state), so single-process runs of
    SyncBN configs get Mesa BN; mmengine would revert it to an uncompressed
    ``_BatchNormXd`` only after the model is built."""
    for name, child in module.named_children():
        if isinstance(child, nn.SyncBatchNorm):
            bn = nn.BatchNorm2d(child.num_features, child.eps, child.momentum, child.affine,
                                child.track_running_stats)
            bn.load_state_dict(child.state_dict())
            bn.train(child.training)
            setattr(module, name, bn)
        else:
            _sync_bn_to_bn(child)
    return module


@MODELS.register_module()
class MesaEncoderDecoder(EncoderDecoder):
    """mmseg's ``EncoderDecoder`` with Mesa on the neck and heads.

    Args:
        mesa (dict, optional): Mesa policy (see ``mesa_seg.mesa.MesaPolicy``) for
            the neck, decode head and auxiliary heads; it updates
            ``HEAD_MESA_DEFAULTS``. None or ``enabled=False`` keeps them in full
            precision. Default: None.
        fused_loss (bool): compute plain cross-entropy losses with the exact
            fused resize + cross-entropy, which keeps only the low-resolution
            logits for backward. Heads with other losses keep mmseg's path (one
            log line says why). Default: True.
        **kwargs: the arguments of ``EncoderDecoder``.
    """

    def __init__(self, *args, mesa: Optional[dict] = None, fused_loss: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        policy = MesaPolicy.from_arg(mesa, HEAD_MESA_DEFAULTS)
        parts = [getattr(self, name) for name in ('neck', 'decode_head', 'auxiliary_head')
                 if getattr(self, name, None) is not None]
        if policy.enabled:
            distributed = dist.is_available() and dist.is_initialized() \
                and dist.get_world_size() > 1
            for part in parts:
                if not distributed:
                    _sync_bn_to_bn(part)
                mesafy_(part, policy)
            if distributed and any(isinstance(m, nn.SyncBatchNorm) for p in parts
                                   for m in p.modules()):
                print_log('Mesa: SyncBatchNorm layers stay in full precision (Mesa '
                          'compresses BatchNorm2d); use norm_cfg=dict(type="BN") to '
                          'compress them.', logger='current')
        if fused_loss:
            heads = [self.decode_head]
            aux = getattr(self, 'auxiliary_head', None)
            if aux is not None:
                heads += list(aux) if isinstance(aux, nn.ModuleList) else [aux]
            for head in heads:
                reason = fused_loss_supported(head)
                if reason is None:
                    _with_fused_loss(head)
                else:
                    print_log(f'Mesa: {type(head).__name__} keeps the unfused loss: '
                              f'{reason}', logger='current')

    def parse_losses(self, losses):
        """mmengine's ``parse_losses``; a NaN/Inf loss stops training here,
        before backward and the optimizer step (see ``mesa_seg.resilience``)."""
        loss, log_vars = super().parse_losses(losses)
        check_finite_loss(loss, log_vars)
        return loss, log_vars
