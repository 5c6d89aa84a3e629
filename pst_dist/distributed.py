"""Distributed setup in one place: the same entry point runs under python, torchrun, the deepspeed launcher and
Ray Train workers, all of which set RANK / WORLD_SIZE / LOCAL_RANK (and MASTER_ADDR / MASTER_PORT)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int

    @property
    def is_primary(self) -> bool:
        return self.rank == 0


def init_distributed(device: str) -> DistInfo:
    """Read the launcher's environment; join the process group when there is more than one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device == "cuda" else "gloo"
        if device == "cuda":
            torch.cuda.set_device(local)
        dist.init_process_group(backend=backend, rank=rank, world_size=world)
    return DistInfo(rank, world, local)


def all_reduce_grads(params, world_size: int) -> None:
    """Average gradients across ranks (plain data parallelism; the DeepSpeed engine does this itself)."""
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= world_size


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
