"""Coverage audit: what autograd keeps for backward, and what a policy misses.

Runs one training forward under ``torch.autograd.graph.saved_tensors_hooks``
and records every saved tensor that is not a parameter/buffer of the model:
its bytes (each storage counted once), dtype, the innermost module running at
the time and the torch function that saved it. A Mesa op saves uint8 codes (or
a 1-bit mask) plus tiny statistics (per-group ranges, LayerNorm/BatchNorm
mean and rstd); anything else is an uncompressed activation. The store-once
ops of :mod:`.shared_ops` run outside the Mesa modules whose quantizers they
use (a block calls them): their saves are attributed to the module owning the
quantizer that makes the copy. Other Mesa storage made outside a Mesa module
(the fused loss's 8-bit logits) tags its tensors with :func:`mark_compressed`.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional, Tuple

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from .modules import MesaModule
from .quantizer import ActivationQuantizer
from .shared_ops import running_quantizer

__all__ = ['SavedTensorRecord', 'audit_saved_tensors', 'summarize', 'format_audit',
           'mark_compressed']

_COMPRESSED_TAG = '_mesa_compressed'


@dataclass(frozen=True)
class SavedTensorRecord:
    module: str          # qualified name of the innermost running module ('' = root)
    module_type: str     # its class name
    op: str              # torch function active when autograd saved it
    shape: Tuple[int, ...]
    dtype: str
    nbytes: int          # 0 when the storage was already counted (a view / re-save)
    compressed: bool     # saved by a Mesa op: uint8 codes/bit masks and their statistics


def mark_compressed(*tensors: torch.Tensor) -> None:
    """Tag ``tensors`` (an op's 8-bit codes and their ranges) as Mesa's
    compressed copies when autograd saves them: for Mesa storage made outside
    a Mesa module, whose saves the audit cannot otherwise tell from the
    op's full-precision ones."""
    for t in tensors:
        setattr(t, _COMPRESSED_TAG, True)


class _OpTracker(TorchFunctionMode):
    """Remembers the innermost torch function being called (for attribution)."""

    def __init__(self):
        super().__init__()
        self.stack: List[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.stack.append(getattr(func, '__name__', str(func)))
        try:
            return func(*args, **(kwargs or {}))
        finally:
            self.stack.pop()


def audit_saved_tensors(model: nn.Module, *inputs,
                        forward_fn: Optional[Callable[[], torch.Tensor]] = None
                        ) -> List[SavedTensorRecord]:
    """Run one training forward of ``model`` and list what autograd saved.

    Args:
        model (nn.Module): the model; it is put in training mode for the call
            and restored afterwards. Like any training forward this updates
            running statistics (BatchNorm, Mesa ranges).
        *inputs: passed to ``model`` when ``forward_fn`` is None.
        forward_fn (callable, optional): runs the forward (e.g. model + loss) and
            returns anything; use it for models with dict inputs. Default: None.

    Returns:
        list[SavedTensorRecord]: in the order autograd saved them.
    """
    owned = {t.untyped_storage().data_ptr()
             for t in list(model.parameters()) + list(model.buffers()) if t.numel()}
    names = {id(m): n for n, m in model.named_modules()}
    # A quantizer's owner: the module it is registered in.
    owners = {id(q): parent for parent in model.modules()
              for q in parent.children() if isinstance(q, ActivationQuantizer)}
    module_stack: List[nn.Module] = []
    seen: set = set()
    records: List[SavedTensorRecord] = []
    tracker = _OpTracker()

    def pre_hook(module, args):
        module_stack.append(module)

    def post_hook(module, args, output):
        module_stack.pop()

    def pack(t: torch.Tensor):
        if t.numel() == 0 or t.device.type == 'meta':
            return t
        ptr = t.untyped_storage().data_ptr()
        if ptr in owned:
            return t
        fresh = ptr not in seen
        seen.add(ptr)
        module = module_stack[-1] if module_stack else model
        quantizer = None if tracker.stack else running_quantizer()
        shared_owner = owners.get(id(quantizer)) if quantizer is not None else None
        if shared_owner is not None:
            module = shared_owner
        # Custom autograd Functions (the Mesa ops) bypass the function mode, so a
        # save with no torch function running inside a Mesa module is a Mesa op's.
        by_mesa_op = (shared_owner is not None or getattr(t, _COMPRESSED_TAG, False)
                      or isinstance(module, MesaModule) and not tracker.stack)
        records.append(SavedTensorRecord(
            module=names.get(id(module), '?'), module_type=type(module).__name__,
            op=tracker.stack[-1] if tracker.stack else type(module).__name__,
            shape=tuple(t.shape), dtype=str(t.dtype).replace('torch.', ''),
            nbytes=t.untyped_storage().nbytes() if fresh else 0,
            compressed=by_mesa_op))
        return t

    handles = [m.register_forward_pre_hook(pre_hook) for m in model.modules()]
    handles += [m.register_forward_hook(post_hook, always_call=True) for m in model.modules()]
    was_training = model.training
    model.train()
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), tracker:
            out = forward_fn() if forward_fn is not None else model(*inputs)
        del out  # frees the graph and what it saved
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return records


def summarize(records: Iterable[SavedTensorRecord], key: Callable[[SavedTensorRecord], str]
              ) -> Dict[str, Dict[str, int]]:
    """Bytes per ``key(record)``, split into compressed / uncompressed."""
    table: Dict[str, Dict[str, int]] = defaultdict(lambda: {'compressed': 0, 'uncompressed': 0})
    for r in records:
        table[key(r)]['compressed' if r.compressed else 'uncompressed'] += r.nbytes
    return dict(table)


def format_audit(records: List[SavedTensorRecord], top: int = 20) -> str:
    """A readable report: totals and the largest uncompressed saved tensors."""
    mb = 1024 ** 2
    comp = sum(r.nbytes for r in records if r.compressed)
    raw = [r for r in records if not r.compressed and r.nbytes]
    raw_total = sum(r.nbytes for r in raw)
    lines = [f'saved for backward: {(comp + raw_total) / mb:.1f} MB '
             f'(compressed {comp / mb:.1f} MB, uncompressed {raw_total / mb:.1f} MB '
             f'in {len(raw)} tensors)']
    if raw:
        lines.append(f'{"MB":>8}  {"dtype":<9} {"op":<22} {"module":<45} shape')
        for r in sorted(raw, key=lambda r: -r.nbytes)[:top]:
            lines.append(f'{r.nbytes / mb:8.2f}  {r.dtype:<9} {r.op[:22]:<22} '
                         f'{(r.module or "<root>")[:45]:<45} {list(r.shape)}')
        if len(raw) > top:
            lines.append(f'... {len(raw) - top} more uncompressed tensors')
    return '\n'.join(lines)
