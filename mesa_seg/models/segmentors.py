"""``MesaEncoderDecoder``: Mesa for the neck and decode heads, set from the config.

The backbone carries its own ``mesa`` policy (``MesaSwinTransformer``,
``MesaPVT``...). This segmentor applies a second policy to everything after
it — neck, decode head, auxiliary heads (their Conv2d/BN/ReLU hold about as
much activation memory as a Swin-T backbone) — and, with ``fused_loss``,
computes the losses with the low-memory :func:`resize_cross_entropy`, which
under Mesa keeps its logits in 8 bits too (``mesa_loss``).

``backbone_mesa`` puts Mesa on any other mmseg backbone from the config, with
no class to write: the built backbone's torch layers are converted in place
(:func:`apply_backbone_mesa_`), so its ``state_dict`` keys, ``init_cfg`` and
checkpoints are unchanged. What it cannot see: operations a backbone calls as
functions (``q @ k.transpose(...)``, ``F.softmax``, ``F.gelu``, ``F.interpolate``
inside ``forward``) are not modules, so they keep saving full-precision
tensors; ``mesa_seg.mesa.audit_saved_tensors`` + ``format_audit`` list them.
Backbones with a Mesa class (``MesaSwinTransformer``, ``MesaMixVisionTransformer``,
``MesaVisionTransformer``, ``MesaPVT``...) replace those functional ops and
should be preferred.
"""
from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Union

import torch
from mmengine.dist import get_dist_info
from mmengine.logging import MessageHub, print_log
from mmseg.models.segmentors import EncoderDecoder
from mmseg.registry import MODELS
from torch import nn

from ..distributed import is_distributed, ranks_with
from ..errors import NonFiniteLossError
from ..mesa import MesaModule, MesaPolicy, mesafy_
from .decode_heads import store_once_heads_
from .losses import FusedLossHeadMixin, fused_loss_supported
from .torch_layers import mmcv_to_torch_layers_

__all__ = [
    'MesaEncoderDecoder', 'HEAD_MESA_DEFAULTS', 'check_finite_loss',
    'convert_sync_bn_to_bn2d', 'apply_backbone_mesa_', 'sync_bn_wrappers_to_torch_',
    'loss_heads'
]

# Conv heads: per-channel ranges (BatchNorm's per-channel statistics over few
# pixels, e.g. pooled 1x1 maps, need them), widened to cover each batch: heads
# trained from scratch outgrow the running range (README, "Convergence":
# clipped heads fell well behind FP32, widened ones track it).
HEAD_MESA_DEFAULTS = dict(groups='channels', widen_to_batch=True)

_FUSED_CLASSES: Dict[type, type] = {}


def loss_heads(segmentor: nn.Module) -> List[nn.Module]:
    """The heads that compute a loss: the decode head, then the auxiliary
    head(s) (mmseg builds a list of them as an ``nn.ModuleList``)."""
    heads = [segmentor.decode_head]
    aux = getattr(segmentor, 'auxiliary_head', None)
    if aux is not None:
        heads += list(aux) if isinstance(aux, nn.ModuleList) else [aux]
    return heads


def _with_fused_loss(head: nn.Module) -> None:
    """Give ``head`` the fused ``loss_by_feat`` (a subclass: same state_dict)."""
    cls = type(head)
    if cls not in _FUSED_CLASSES:
        fused = type(f'FusedLoss{cls.__name__}', (FusedLossHeadMixin, cls), {})
        fused.__module__ = __name__
        globals()[fused.__name__] = fused  # picklable by reference
        _FUSED_CLASSES[cls] = fused
    head.__class__ = _FUSED_CLASSES[cls]


def convert_sync_bn_to_bn2d(module: nn.Module) -> nn.Module:
    """Replace the built ``SyncBatchNorm`` modules in ``module`` by
    ``BatchNorm2d`` (same state), in place, so single-process runs of SyncBN
    configs get Mesa BN; mmengine would revert them to an uncompressed
    ``_BatchNormXd`` only after the model is built. (For a config dict, see
    :func:`mesa_seg.compat.sync_bn_cfg_to_bn`.)"""
    for name, child in module.named_children():
        if isinstance(child, nn.SyncBatchNorm):
            bn = nn.BatchNorm2d(child.num_features, child.eps, child.momentum, child.affine,
                                child.track_running_stats)
            bn.load_state_dict(child.state_dict())
            bn.train(child.training)
            setattr(module, name, bn)
        else:
            convert_sync_bn_to_bn2d(child)
    return module


def sync_bn_wrappers_to_torch_(module: nn.Module) -> int:
    """Give torch's ``SyncBatchNorm`` class back to mmengine's wrapper of it, in
    place; returns how many layers changed.

    mmcv's ``SyncBN`` norm layer builds mmengine's ``SyncBatchNorm``, a subclass
    of torch's that only re-checks the input's dims for parrots (on torch it
    calls torch's check). Mesa converts exact torch types, so without this the
    SyncBN layers of a distributed run would stay in full precision.
    """
    from mmengine.utils.dl_utils.parrots_wrapper import SyncBatchNorm as Wrapper
    if Wrapper.__bases__ != (nn.SyncBatchNorm, ):
        return 0
    changed = 0
    for child in module.modules():
        if type(child) is Wrapper:
            child.__class__ = nn.SyncBatchNorm
            changed += 1
    return changed


def _sync_bn_for_mesa_(module: nn.Module, distributed: bool) -> None:
    """SyncBN layers in the class Mesa converts: torch's ``SyncBatchNorm``
    (-> ``MesaSyncBatchNorm``) when the run is distributed, ``BatchNorm2d``
    (-> ``MesaBatchNorm2d``: nothing to sync) otherwise."""
    if distributed:
        sync_bn_wrappers_to_torch_(module)
    else:
        convert_sync_bn_to_bn2d(module)


def apply_backbone_mesa_(backbone: nn.Module, policy: MesaPolicy,
                         convert_sync_bn: bool = True) -> nn.Module:
    """Put Mesa on a built backbone made of torch layers, in place.

    mmcv's layer wrappers get their torch classes back
    (:func:`~mesa_seg.models.torch_layers.mmcv_to_torch_layers_`),
    ``SyncBatchNorm`` becomes ``BatchNorm2d`` when ``convert_sync_bn`` (single
    process), else torch's ``SyncBatchNorm`` (:func:`sync_bn_wrappers_to_torch_`),
    then :func:`mesafy_` converts what ``policy`` selects.
    Parameters are shared and module names kept, so ``state_dict`` keys do not
    change. torch's RNG is left as it was: ``init_weights()`` draws the weights
    the plain backbone would.

    Raises:
        ValueError: ``backbone`` already has Mesa layers (a Mesa backbone
            class takes its policy through its own ``mesa`` argument).
    """
    if not policy.enabled:
        return backbone
    if any(isinstance(m, MesaModule) for m in backbone.modules()):
        raise ValueError(f'backbone_mesa: {type(backbone).__name__} already has Mesa '
                         'layers; set its policy with its own `mesa` argument')
    mmcv_to_torch_layers_(backbone)
    _sync_bn_for_mesa_(backbone, distributed=not convert_sync_bn)
    with torch.random.fork_rng(devices=[]):
        return mesafy_(backbone, policy)


def check_finite_loss(loss: torch.Tensor,
                      log_vars: Mapping[str, Union[torch.Tensor, float]]
                      ) -> None:
    """Raise :class:`~mesa_seg.errors.NonFiniteLossError` if ``loss`` is NaN/Inf.

    Called on the parsed loss, before backward: the optimizer never steps a
    NaN into the weights, and the last checkpoint stays usable. Costs one
    host synchronisation per iteration (mmengine's logging takes one anyway).
    In a distributed run every rank calls it at the same point and the ranks
    exchange one flag each (:func:`mesa_seg.distributed.ranks_with`, one
    all-reduce of ``world_size`` int32s), so a NaN on one rank stops all of
    them before the optimizer step, each naming the rank(s) that saw it.
    """
    bad_ranks = ranks_with(~torch.isfinite(loss.detach()).all())
    if not bad_ranks:
        return
    rank, world_size = get_dist_info()
    it = MessageHub.get_current_instance().get_info('iter')
    where = f' at iteration {it + 1}' if it is not None else ''
    if world_size > 1:
        where += (f' on rank{"s" if len(bad_ranks) > 1 else ""} '
                  f'{", ".join(map(str, bad_ranks))} of {world_size}')
    if rank in bad_ranks:
        terms = ', '.join(f'{k}={float(torch.as_tensor(v).detach()):.4g}'
                          for k, v in log_vars.items() if 'loss' in k)
        where += f' ({terms})'
    stopped = 'training stopped' if world_size == 1 else \
        'training stopped on every rank'
    raise NonFiniteLossError(
        f'non-finite loss{where}; {stopped} before the '
        'optimizer step: parameters, optimizer state and checkpoints are '
        'intact. A NaN/Inf '
        'reached the forward pass (input data, learning rate too high, AMP '
        'overflow); Mesa keeps its running ranges unchanged on such batches '
        '(mesa_seg/mesa/observer.py). Fix the cause and continue with '
        '--resume.')


@MODELS.register_module()
class MesaEncoderDecoder(EncoderDecoder):
    """mmseg's ``EncoderDecoder`` with Mesa on the neck and heads.

    Args:
        mesa (dict, optional): Mesa policy (see ``mesa_seg.mesa.MesaPolicy``) for
            the neck, decode head and auxiliary heads; it updates
            ``HEAD_MESA_DEFAULTS``. None or ``enabled=False`` keeps them in full
            precision. Their ``SyncBN`` layers become ``MesaSyncBatchNorm`` in a
            distributed run and ``MesaBatchNorm2d`` in a single process.
            Default: None.
        backbone_mesa (dict, optional): Mesa policy for a backbone that has no
            Mesa class (any mmseg backbone made of torch layers: ResNet,
            MixVisionTransformer, ...), applied to the built backbone by
            :func:`apply_backbone_mesa_` (a dict updates the ``MesaPolicy``
            defaults: every layer type, groups='heads'; for conv backbones
            ``groups='channels', widen_to_batch=True`` as for the heads suits
            better). Layers the backbone calls as functions stay in full
            precision (see the module docstring). None: the backbone is left
            as built. Default: None.
        fused_loss (bool): compute plain cross-entropy losses with the exact
            fused resize + cross-entropy, which keeps only the low-resolution
            logits for backward. Heads with other losses keep mmseg's path (one
            log line says why). Default: True.
        mesa_loss (bool): with ``mesa`` enabled and ``fused_loss``, the fused
            loss keeps those logits in 8 bits (one range per pixel, its top
            score exact; :func:`~mesa_seg.models.losses.resize_cross_entropy`):
            the loss value stays exact, its gradient is Mesa's approximation.
            False keeps them in fp32 (the exact loss gradient). Default: True.
        **kwargs: the arguments of ``EncoderDecoder``.
    """

    def __init__(self, *args, mesa: Optional[dict] = None, fused_loss: bool = True,
                 mesa_loss: bool = True, backbone_mesa: Optional[dict] = None, **kwargs):
        super().__init__(*args, **kwargs)
        distributed = is_distributed()
        if backbone_mesa is not None:
            apply_backbone_mesa_(self.backbone, MesaPolicy.from_arg(backbone_mesa),
                                 convert_sync_bn=not distributed)
        policy = MesaPolicy.from_arg(mesa, HEAD_MESA_DEFAULTS)
        parts = [getattr(self, name) for name in ('neck', 'decode_head', 'auxiliary_head')
                 if getattr(self, name, None) is not None]
        if policy.enabled:
            for part in parts:
                _sync_bn_for_mesa_(part, distributed)
                mesafy_(part, policy)
                store_once_heads_(part)
            kept = sum(isinstance(m, nn.SyncBatchNorm) and not isinstance(m, MesaModule)
                       for p in parts for m in p.modules())
            if kept:
                print_log(f'Mesa: {kept} SyncBatchNorm layer(s) of the neck/heads stay in '
                          'full precision: the head Mesa policy (layers/include/exclude) '
                          'does not select them.', logger='current')
        if fused_loss:
            for head in loss_heads(self):
                reason = fused_loss_supported(head)
                if reason is None:
                    _with_fused_loss(head)
                    head.logits_in_8bit = policy.enabled and mesa_loss
                else:
                    print_log(f'Mesa: {type(head).__name__} keeps the unfused loss: '
                              f'{reason}', logger='current')

    def parse_losses(self, losses):
        """mmengine's ``parse_losses``; a NaN/Inf loss stops training here,
        before backward and the optimizer step (:func:`check_finite_loss`)."""
        loss, log_vars = super().parse_losses(losses)
        check_finite_loss(loss, log_vars)
        return loss, log_vars
