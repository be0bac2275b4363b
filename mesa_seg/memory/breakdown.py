"""Where the activation memory of a segmentor goes: by model part and by op.

Built on :func:`mesa_seg.mesa.audit.audit_saved_tensors`, which attributes each
tensor autograd keeps to the innermost module *called* at the time. mmseg's
decode heads call two methods directly rather than through ``nn.Module``:
``BaseDecodeHead.loss`` runs ``self.forward(...)`` and ``self.loss_by_feat(...)``.
What those methods save themselves (the loss's log-probabilities, the fused
loss's logits, the accuracy's top-k indices) would land on the segmentor root.
:func:`method_scopes` routes both calls through small modules while auditing,
so those tensors are attributed to the head, or to ``loss``.
"""
from __future__ import annotations

import contextlib
import re
from typing import Callable, Dict, Iterator, List, Optional, Tuple

from torch import nn

from ..mesa.audit import audit_saved_tensors, summarize

__all__ = ['method_scopes', 'PartMapper', 'activation_breakdown', 'part_sort_key']

#: methods of a decode head that mmseg calls directly (not via ``__call__``)
SCOPED_METHODS = ('forward', 'loss_by_feat')

_STAGE_CONTAINERS = ('stages', 'layers', 'stage', 'blocks')
_INDEXED = re.compile(r'^[A-Za-z_]*?[A-Za-z]_?(\d+)$')
_HEAD_PARTS = ('neck', 'decode_head', 'auxiliary_head')


class _MethodScope(nn.Module):
    """Calls a bound method through ``nn.Module.__call__`` so hooks see it."""

    def __init__(self, method: Callable):
        super().__init__()
        self.method = method

    def forward(self, *args, **kwargs):
        return self.method(*args, **kwargs)


@contextlib.contextmanager
def method_scopes(model: nn.Module) -> Iterator[None]:
    """Temporarily make each decode head's ``forward`` and ``loss_by_feat``
    submodules named ``<head>.forward`` / ``<head>.loss_by_feat``.

    Applies to every module with a ``loss_by_feat`` method (mmseg's
    ``BaseDecodeHead`` and subclasses). Nothing else changes: the scopes hold no
    state, and are removed (with the instance attributes that route the calls
    to them) on exit.
    """
    installed: List[Tuple[nn.Module, str]] = []
    try:
        for module in list(model.modules()):
            if not callable(getattr(type(module), 'loss_by_feat', None)):
                continue
            for name in SCOPED_METHODS:
                if name in module._modules or name in module.__dict__:
                    continue
                scope = _MethodScope(getattr(module, name))
                # _modules: the audit names it; __dict__: self.<name>(...) finds it
                # before the class's method.
                module._modules[name] = scope
                object.__setattr__(module, name, scope)
                installed.append((module, name))
        yield
    finally:
        for module, name in installed:
            del module._modules[name]
            del module.__dict__[name]


def _stage_index_base(backbone: Optional[nn.Module]) -> int:
    """0 when the backbone numbers its top-level children from 0 (mmseg Swin's
    ``norm0``), else 1 (official PVT's ``block1``/``patch_embed1``)."""
    if backbone is None:
        return 0
    found = [int(m.group(1)) for name, _ in backbone.named_children()
             if (m := _INDEXED.match(name))]
    return min(found) if found and min(found) == 0 else 1


class PartMapper:
    """Maps a module name of a segmentor to a part of the model.

    Parts: ``backbone.stem`` (un-numbered top-level children of the backbone,
    e.g. Swin's ``patch_embed``), ``backbone.stage<k>`` (``stages.<k-1>``,
    ``layers.<k-1>``, or children with a stage number such as ``block<k>``,
    ``norm<k>``), ``neck``, ``decode_head``, ``auxiliary_head``, ``loss`` (loss
    modules and everything a head's ``loss_by_feat`` saves) and ``other``.

    Args:
        model (nn.Module): the segmentor (its backbone decides the numbering).
    """

    def __init__(self, model: nn.Module):
        self.base = _stage_index_base(getattr(model, 'backbone', None))

    def __call__(self, module: str, module_type: str = '') -> str:
        names = module.split('.') if module else []
        if module_type.endswith('Loss') or any(
                n == 'loss_by_feat' or n.startswith('loss') for n in names):
            return 'loss'
        if not names:
            return 'other'
        if names[0] == 'backbone':
            return 'backbone.' + self._stage(names[1:])
        if names[0] in _HEAD_PARTS:
            return names[0]
        return 'other'

    def _stage(self, names: List[str]) -> str:
        if not names:
            return 'stem'
        if names[0] in _STAGE_CONTAINERS and len(names) > 1 and names[1].isdigit():
            return f'stage{int(names[1]) + 1}'
        m = _INDEXED.match(names[0])
        if m:
            return f'stage{int(m.group(1)) + 1 - self.base}'
        return 'stem'


def part_sort_key(part: str) -> Tuple[int, int, str]:
    """Model order: stem, stages, neck, heads, loss, other."""
    if part.startswith('backbone.stage'):
        return (1, int(part[len('backbone.stage'):]), part)
    order = {'backbone.stem': 0, 'neck': 2, 'decode_head': 3, 'auxiliary_head': 4,
             'loss': 5}
    return (order.get(part, 6 if part != 'other' else 7), 0, part)


def _op_name(record) -> str:
    # Custom autograd Functions are invisible to the audit's op tracker, which
    # then names the innermost module instead: for a scope, say where it ran.
    if record.op == _MethodScope.__name__:
        return f'custom Function in {record.module.rsplit(".", 1)[-1]}'
    return record.op


def activation_breakdown(model: nn.Module, forward_fn: Callable[[], object],
                         top: int = 10) -> Dict:
    """Audit one training forward (``forward_fn``: preprocess + forward + loss,
    no backward) and return the bytes autograd keeps for backward.

    Returns:
        dict: ``total``/``compressed``/``uncompressed`` bytes, ``by_part`` and
        ``by_op`` (each ``{name: {'compressed': b, 'uncompressed': b}}``, parts
        in model order, ops largest first), ``largest``: the ``top`` largest
        uncompressed tensors, and ``tensors``: how many were saved.
    """
    mapper = PartMapper(model)
    with method_scopes(model):
        records = audit_saved_tensors(model, forward_fn=forward_fn)
    compressed = sum(r.nbytes for r in records if r.compressed)
    uncompressed = sum(r.nbytes for r in records if not r.compressed)
    by_part = summarize(records, lambda r: mapper(r.module, r.module_type))
    by_op = summarize(records, lambda r: r.op)
    largest = sorted((r for r in records if not r.compressed and r.nbytes),
                     key=lambda r: -r.nbytes)[:top]
    return dict(
        total=compressed + uncompressed,
        compressed=compressed,
        uncompressed=uncompressed,
        tensors=len(records),
        by_part={k: by_part[k] for k in sorted(by_part, key=part_sort_key)},
        by_op=dict(sorted(by_op.items(), key=lambda kv: -sum(kv[1].values()))),
        largest=[dict(module=r.module, part=mapper(r.module, r.module_type), op=_op_name(r),
                      shape=list(r.shape), dtype=r.dtype, nbytes=r.nbytes)
                 for r in largest],
    )
