"""Activation checkpointing of transformer blocks: full or selective.

Every backbone of this package takes ``with_cp`` (see :data:`CHECKPOINT_MODES`)
and runs each transformer block through :func:`checkpoint_block`:

* ``False``: no checkpointing.
* ``True``: the block's forward keeps nothing for backward but its inputs and is
  run again in backward (as ``with_cp`` of mmseg's Swin and MiT).
* ``'selective'``: selective activation checkpointing (SAC): matrix products
  and convolutions (:data:`SAVED_OPS`) keep their outputs; everything else
  (norms, activations, softmax, dropout, reshapes) is recomputed in backward.
  Less memory than no checkpointing, more than ``True``, and the expensive ops
  are not run twice. Under Mesa it keeps those outputs in full precision,
  which can outweigh Mesa's 8-bit copies of every layer input: combine Mesa
  with ``True``.

Under Mesa, checkpointing changes nothing but memory and time: the buffers a
block updates in its forward (running ranges, rounding-step counters) are
updated once per step, and the recomputation quantizes with the ranges and
rounding seeds of the forward (see ``state`` of :func:`checkpoint_block`).

Both checkpointed modes are exact: the forward output and the gradients equal
those of ``with_cp=False``, bit for bit, dropout and drop path included (why
this is torch's eager checkpoint and not the ``torch.compile`` activation
memory budget: see :func:`checkpoint_block`).
"""
import contextlib
import inspect
from typing import Any, Callable, List, Optional, Union

import torch
from torch import nn
from torch.utils.checkpoint import (CheckpointPolicy, checkpoint,
                                    create_selective_checkpoint_contexts)

__all__ = [
    'CHECKPOINT_MODES', 'SAVED_OPS', 'check_with_cp', 'checkpoint_block',
    'selective_checkpoint_policy'
]

CheckpointMode = Union[bool, str]

#: The accepted values of ``with_cp``.
CHECKPOINT_MODES = (False, True, 'selective')


def _aten_ops(*names: str) -> frozenset:
    aten = torch.ops.aten
    return frozenset(getattr(aten, name) for name in names if hasattr(aten, name))


#: aten ops (all overloads) whose outputs ``'selective'`` keeps for backward:
#: matrix products, convolutions and fused attention, the ops that cost the
#: most to recompute per byte they produce. ``matmul``/``linear`` decompose
#: into ``mm``/``addmm``/``bmm`` before SAC sees them; listed for clarity.
SAVED_OPS = _aten_ops(
    'mm', 'addmm', 'bmm', 'baddbmm', 'addbmm', 'matmul', 'linear',
    '_addmm_activation', '_int_mm', '_scaled_mm', 'convolution',
    '_convolution', '_scaled_dot_product_flash_attention',
    '_scaled_dot_product_flash_attention_for_cpu',
    '_scaled_dot_product_efficient_attention',
    '_scaled_dot_product_cudnn_attention',
    '_scaled_dot_product_fused_attention_overrideable')


def selective_checkpoint_policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    """SAC policy: save the outputs of :data:`SAVED_OPS`, recompute the rest.

    For ``create_selective_checkpoint_contexts``.
    """
    packet = getattr(op, 'overloadpacket', op)
    if packet in SAVED_OPS:
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def check_with_cp(with_cp: Any) -> CheckpointMode:
    """Return ``with_cp`` if it is one of :data:`CHECKPOINT_MODES`.

    Raises:
        ValueError: any other value (including other truthy values, which
            mmseg would take as ``True``).
    """
    if isinstance(with_cp, bool) or (isinstance(with_cp, str)
                                     and with_cp == 'selective'):
        return with_cp
    raise ValueError(
        "with_cp must be False, True (checkpoint every block) or 'selective' "
        '(keep matmul/conv outputs, recompute the rest), got '
        f'{with_cp!r}')


# Tensors SAC keeps are held outside the autograd graph; with this flag they go
# through the surrounding saved_tensors_hooks (save_on_cpu, the memory audit)
# like every other saved tensor. torch announces it as its future default.
_RESPECT_HOOKS = ('respect_saved_tensors_hooks'
                  in inspect.signature(checkpoint).parameters)


def _copy_all(dst: List[torch.Tensor], src: List[torch.Tensor]) -> None:
    if dst:
        torch._foreach_copy_(dst, src)


def _clone_all(tensors: List[torch.Tensor]) -> List[torch.Tensor]:
    out = [torch.empty_like(t) for t in tensors]
    _copy_all(out, tensors)
    return out


class _BufferReplay:
    """Lets a recomputation see a module's buffers as the forward saw them.

    Checkpointing runs a block's forward twice per step. Buffers the forward
    updates in place (Mesa's running ranges and rounding-step counters,
    BatchNorm statistics) would be updated twice, and the recomputation would
    quantize with other ranges and rounding seeds than the forward. Like the
    RNG state, which checkpoint restores for the recomputation and puts back
    afterwards, the buffers the forward changed are set back to their values
    before the forward while the block is recomputed, and afterwards to the
    values they had before the recomputation: every update happens once, and
    the recomputation is a bit-exact replay of the forward.
    """

    def __init__(self, module: nn.Module):
        self.buffers = list(module.buffers())
        self.versions = [b._version for b in self.buffers]
        self.before = _clone_all(self.buffers)

    def forward_done(self) -> None:
        """Keep only what the forward changed (in place: version counters)."""
        changed = [i for i, (b, v) in enumerate(zip(self.buffers, self.versions))
                   if b._version != v]
        self.buffers = [self.buffers[i] for i in changed]
        self.before = [self.before[i] for i in changed]
        del self.versions

    @contextlib.contextmanager
    def recompute(self):
        if not self.buffers:
            yield
            return
        after = _clone_all(self.buffers)
        _copy_all(self.buffers, self.before)
        try:
            yield
        finally:
            _copy_all(self.buffers, after)


def checkpoint_block(fn: Callable[..., Any],
                     *args: Any,
                     mode: CheckpointMode,
                     state: Optional[nn.Module] = None,
                     **kwargs: Any) -> Any:
    """Run ``fn(*args, **kwargs)``, checkpointed as ``mode`` says.

    Checkpointing applies when ``mode`` is true, autograd is recording and a
    tensor in ``args`` requires grad (mmseg's Swin condition); otherwise
    ``fn`` just runs.

    It is torch's non-reentrant checkpoint
    (``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)``), which,
    unlike the reentrant one, gives parameter gradients even when no input
    requires grad, takes keyword arguments, works with custom autograd
    Functions such as Mesa's ops and with ``torch.autograd.grad``, and, as
    the reentrant one does, restores the RNG state for the recomputation, so
    dropout and drop path draw the same masks (exact gradients).
    ``mode='selective'`` adds ``context_fn=partial(``
    ``create_selective_checkpoint_contexts,``
    :func:`selective_checkpoint_policy` ``)`` (selective activation
    checkpointing, SAC).

    Why not ``torch._functorch.config.activation_memory_budget`` (the
    ``torch.compile`` knapsack over recomputation): below 1.0 it recomputes
    random ops (dropout, drop path) with fresh randomness (open upstream
    bugs), so with drop path on, as in the Swin and PVT recipes, its gradients
    are silently wrong. Non-reentrant checkpoint, SAC included, restores the
    RNG state before recomputing.

    Args:
        fn (callable): The block's forward.
        *args: Positional arguments of ``fn``.
        mode (bool | str): ``False``, ``True`` or ``'selective'``.
        state (nn.Module, optional): The module ``fn`` belongs to. Its buffers
            that the forward updates in place (Mesa's running ranges and
            rounding steps) are updated once per step, not again by the
            recomputation, which sees them as the forward did: Mesa then
            quantizes exactly as without checkpointing. Default: None.
        **kwargs: Keyword arguments of ``fn``.

    Returns:
        What ``fn`` returns.

    Raises:
        ValueError: ``mode`` is not one of :data:`CHECKPOINT_MODES`.
    """
    if not check_with_cp(mode) or not torch.is_grad_enabled() or not any(
            isinstance(a, torch.Tensor) and a.requires_grad for a in args):
        return fn(*args, **kwargs)
    selective = mode == 'selective'
    # Under torch.compile, context_fn must return dispatch modes only.
    replay = (None if state is None or torch.compiler.is_compiling() else
              _BufferReplay(state))

    def context_fn():
        if selective:
            forward_ctx, recompute_ctx = create_selective_checkpoint_contexts(
                selective_checkpoint_policy)
        else:
            forward_ctx = recompute_ctx = contextlib.nullcontext()
        if replay is not None:
            recompute_ctx = _chain(replay.recompute(), recompute_ctx)
        return forward_ctx, recompute_ctx

    options = {}
    if selective and _RESPECT_HOOKS:
        options['respect_saved_tensors_hooks'] = True
    if selective or replay is not None:
        options['context_fn'] = context_fn
    out = checkpoint(fn, *args, use_reentrant=False, **options, **kwargs)
    if replay is not None:
        replay.forward_done()
    return out


@contextlib.contextmanager
def _chain(outer, inner):
    with outer, inner:
        yield
