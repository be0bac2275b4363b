"""Running a function on several gloo ranks in spawned processes (the
distributed tests: tests/test_resilience_dist.py, tests/test_sync_batchnorm.py)."""
import os
import socket
import time

import pytest
import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def run_ranks(target, args: tuple, out: str, world_size: int, timeout_s: float) -> list:
    """Run ``target(rank, *args)`` on ``world_size`` spawned processes; each rank
    saves its results to ``out/rank{rank}.pt``. Returns them in rank order;
    fails the test (and kills what is left) after ``timeout_s``."""
    ctx = mp.start_processes(target, args=args, nprocs=world_size, join=False,
                             start_method='spawn')
    deadline = time.time() + timeout_s
    try:
        while not ctx.join(timeout=max(deadline - time.time(), 0.1)):
            if time.time() >= deadline:
                pytest.fail(f'the {world_size} ranks did not finish in {timeout_s} s')
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    return [torch.load(os.path.join(out, f'rank{r}.pt'), weights_only=True)
            for r in range(world_size)]
