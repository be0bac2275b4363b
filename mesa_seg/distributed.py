"""The few collectives the fault handling of distributed runs needs.

Every rank must stop at the same point, and say why, when one of them sees a
fault; otherwise the others block in the next collective until the process
group's timeout. Each helper here is one tiny collective (or none, outside a
distributed run):

- :func:`ranks_with`: which ranks raised a flag (a NaN/Inf loss, SIGTERM);
- :func:`rank0_ok`: whether rank 0 succeeded (a checkpoint save);
- :func:`is_comm_failure` and :func:`unresponsive_ranks`: after a collective
  failed (a peer closed its connections, or did not answer within the process
  group's ``timeout``), which ranks are gone, asked through the rendezvous
  store, which outlives the workers under torchrun.
"""
from __future__ import annotations

import os
import time
from datetime import timedelta
from typing import List, Optional, Union

import torch
import torch.distributed as dist
from mmengine.dist import get_dist_info

__all__ = [
    'is_distributed', 'collective_device', 'ranks_with',
    'rank0_ok', 'is_comm_failure', 'unresponsive_ranks', 'short_reason'
]

#: Seconds :func:`unresponsive_ranks` waits for the other ranks to answer.
ANSWER_WAIT_S = 5.0

# What gloo / NCCL / c10d say when a peer is gone or silent.
_COMM_FAILURE_MARKERS = (
    'Connection closed by peer', 'Connection reset by peer',
    'Timed out waiting', 'Watchdog caught collective operation timeout',
    'NCCL communicator was aborted', 'NCCL error', 'ProcessGroupGloo',
    'ProcessGroupNCCL', 'gloo/transport')


def is_distributed() -> bool:
    """Whether a process group of more than one rank is initialised."""
    return get_dist_info()[1] > 1


def collective_device() -> torch.device:
    """The device the default group's collectives take tensors on."""
    if dist.get_backend() == 'nccl':
        return torch.device('cuda', torch.cuda.current_device())
    return torch.device('cpu')


def ranks_with(flag: Union[bool, torch.Tensor]) -> List[int]:
    """The ranks whose ``flag`` is set: all ranks must call it at the same
    point. One all-reduce of ``world_size`` int32s; without a process group,
    ``[0]`` or ``[]``.

    Args:
        flag (bool | Tensor): This rank's flag; a 0-dim tensor stays on its
            device until the all-reduce (no extra host synchronisation).
    """
    rank, world_size = get_dist_info()
    if world_size == 1:
        return [0] if bool(flag) else []
    device = collective_device()
    flags = torch.zeros(world_size, dtype=torch.int32, device=device)
    flags[rank] = torch.as_tensor(flag).to(device=device, dtype=torch.int32)
    dist.all_reduce(flags)
    return flags.nonzero().flatten().tolist()


def rank0_ok(ok: bool) -> bool:
    """Rank 0's ``ok``, on every rank (one broadcast; ``ok`` outside a
    process group)."""
    if not is_distributed():
        return ok
    value = torch.tensor([int(ok)], dtype=torch.int32,
                         device=collective_device())
    dist.broadcast(value, src=0)
    return bool(value.item())


def is_comm_failure(error: BaseException) -> bool:
    """Whether ``error`` is a collective that failed because a peer died or
    did not answer (gloo/NCCL report both as ``RuntimeError``s)."""
    if not is_distributed():
        return False
    dist_error = getattr(dist, 'DistError', ())
    if dist_error and isinstance(error, dist_error):
        return True
    return isinstance(error, RuntimeError) and any(
        m in str(error) for m in _COMM_FAILURE_MARKERS)


def unresponsive_ranks(wait_s: float = ANSWER_WAIT_S) -> Optional[List[int]]:
    """After a failed collective: the ranks that do not answer through the
    rendezvous store within ``wait_s`` seconds (dead, hung, or still busy).

    Every rank that notices the failure calls this; each writes its own key
    and waits for the others'. Returns None when the store itself is
    unreachable (it lives in rank 0's process unless a launcher such as
    torchrun hosts it).
    """
    rank, world_size = get_dist_info()
    try:
        store = dist.distributed_c10d._get_default_store()
        store.set_timeout(timedelta(seconds=max(wait_s, 1.0)))
        prefix = f'mesa_seg/alive/{os.environ.get("TORCHELASTIC_RESTART_COUNT", 0)}/'
        store.set(f'{prefix}{rank}', '1')
        deadline = time.monotonic() + wait_s
        silent = set(range(world_size))
        while True:
            silent = {r for r in silent if not store.check([f'{prefix}{r}'])}
            if not silent or time.monotonic() >= deadline:
                return sorted(silent)
            time.sleep(0.1)
    except Exception:  # noqa: BLE001 - any failure: the store is gone too
        return None


def short_reason(error: BaseException, limit: int = 160) -> str:
    """The first sentence of ``error`` without gloo's source-location
    prefix."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else \
        type(error).__name__
    if text.startswith('[') and '] ' in text:  # "[.../pair.cc:561] ..."
        text = text.split('] ', 1)[1]
    text = text.split('. ', 1)[0].rstrip('.')
    return text if len(text) <= limit else text[:limit - 3] + '...'
