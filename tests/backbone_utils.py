"""Shared helpers of the backbone tests (tests/test_{pvt,swin}.py).

Importing this module registers mesa-seg first (compat fixes must run before
mmseg's models are imported).
"""
from typing import Callable, Dict, List, Tuple

import mesa_seg.register  # noqa: F401  (before any mmseg model import)
import torch
from torch import nn

Grads = Dict[str, torch.Tensor]


def fwd_bwd(model: nn.Module, x: torch.Tensor,
            seed: int = 1) -> Tuple[List[torch.Tensor], Grads]:
    """Training forward + backward of a fixed random projection of all outputs.

    Returns the outputs and the gradients of the parameters that got one, plus
    ``'input'``: the gradient of ``x``.
    """
    outs, grads, _ = fwd_bwd_saved(model, x, seed)
    return outs, grads


def fwd_bwd_saved(model: nn.Module, x: torch.Tensor,
                  seed: int = 1) -> Tuple[List[torch.Tensor], Grads, int]:
    """:func:`fwd_bwd`, also returning the bytes kept for backward.

    Those are the unique storages seen by ``saved_tensors_hooks`` during the
    forward, except the parameters, buffers and the input (alive for the whole
    step anyway). Checkpointed blocks contribute their saved inputs and, under
    selective checkpointing, the outputs it keeps (``checkpoint_block`` routes
    them through the hooks).
    """
    model.train()
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    owned = {t.untyped_storage().data_ptr()
             for t in [x, *model.parameters(), *model.buffers()]}
    storages = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in owned:
            storages[s.data_ptr()] = s.nbytes()
        return t

    torch.manual_seed(seed)  # same dropout / drop-path draws for every model
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        outs = model(x)
    gen = torch.Generator().manual_seed(seed)
    loss = sum((o * torch.randn(o.shape, generator=gen)).sum() for o in outs)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()
             if p.grad is not None}
    grads['input'] = x.grad
    return [o.detach() for o in outs], grads, sum(storages.values())


def flat(grads: Grads) -> torch.Tensor:
    """All gradients as one float64 vector (sorted by name)."""
    return torch.cat([grads[k].double().flatten() for k in sorted(grads)])


def saved_bytes(model: nn.Module, x: torch.Tensor) -> int:
    """Bytes kept for backward by one training step (see :func:`fwd_bwd_saved`)."""
    return fwd_bwd_saved(model, x)[2]


def cloned_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """A ``state_dict`` that later training steps of ``model`` do not change
    (Mesa's running ranges are updated in place)."""
    return {k: v.clone() for k, v in model.state_dict().items()}


def checkpointing_saved_bytes(build: Callable[[object], nn.Module],
                              x: torch.Tensor) -> Dict[object, int]:
    """Build ``build(False)``, ``build(True)`` and ``build('selective')`` with
    the same weights; assert that the checkpointed ones give the outputs,
    gradients and buffers (Mesa ranges, rounding steps, BN statistics) of the
    unchecked one bit for bit after one step; return the bytes each saved for
    backward, keyed by ``with_cp``."""
    ref = build(False)
    state = cloned_state_dict(ref)
    outs_ref, grads_ref, nbytes_ref = fwd_bwd_saved(ref, x)
    state_ref = cloned_state_dict(ref)
    nbytes = {False: nbytes_ref}
    for mode in (True, 'selective'):
        model = build(mode)
        model.load_state_dict(state)
        outs, grads, nbytes[mode] = fwd_bwd_saved(model, x)
        for o, o_ref in zip(outs, outs_ref):
            assert torch.equal(o, o_ref), mode
        assert grads.keys() == grads_ref.keys()
        for name, grad in grads.items():
            assert torch.equal(grad, grads_ref[name]), (mode, name)
        for key, value in model.state_dict().items():
            assert torch.equal(value, state_ref[key]), (mode, key)
    return nbytes


#: Quantizers of the second copies that store-once Mesa no longer makes
#: (tests/test_shared_ops.py): the probabilities again as the AV product's
#: first operand, the MLP hidden again as the output Linear's input. They stay
#: in the model (checkpoint keys) and are never updated in training.
STORE_ONCE_SECOND_COPIES = ('.av_matmul.quantizer_a.', '.ffn.layers.1.quantizer.')


def is_store_once_second_copy(name: str) -> bool:
    """Whether the state_dict key or module name ``name`` belongs to one of the
    :data:`STORE_ONCE_SECOND_COPIES` quantizers."""
    return any(part in name + '.' for part in STORE_ONCE_SECOND_COPIES)
