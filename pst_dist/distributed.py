"""Distributed setup in one place: the same entry point runs under python, torchrun, the deepspeed launcher and
Ray Train workers, all of which set RANK / WORLD_SIZE / LOCAL_RANK (and MASTER_ADDR / MASTER_PORT). The engines
that train on top of it (torch, DeepSpeed) are in :mod:`pst_dist.engine`."""

from __future__ import annotations

import os
import socket
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .config import ConfigError


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int

    @property
    def is_primary(self) -> bool:
        return self.rank == 0


_OWN_GROUP = False  # whether this module created the process group (Ray Train creates and destroys its own)


def build_device(cfg) -> torch.device:
    """``train.device``: auto (CUDA when there is a GPU) | cpu | cuda."""
    if cfg.train.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.train.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device='cuda' but no CUDA device is available")
    return torch.device(cfg.train.device)


def init_distributed(device: str, single_process_group: bool = False) -> DistInfo:
    """Read the launcher's environment; join the process group when there is more than one process.

    ``single_process_group``: also create a one-process group when no launcher set one up (DeepSpeed needs a
    process group, and without RANK / WORLD_SIZE in the environment it would try MPI discovery)."""
    global _OWN_GROUP
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cuda":
        torch.cuda.set_device(local)
    if (world > 1 or single_process_group) and not dist.is_initialized():
        backend = "nccl" if device == "cuda" else "gloo"
        if world > 1 or "MASTER_ADDR" in os.environ:
            dist.init_process_group(backend=backend, rank=rank, world_size=world)
        else:  # DeepSpeed also reads these
            os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
            dist.init_process_group(backend=backend, rank=0, world_size=1, init_method=f"tcp://127.0.0.1:{_free_port()}")
        _OWN_GROUP = True
    return DistInfo(rank, world, local)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def all_reduce_grads(params, world_size: int) -> None:
    """Average gradients across ranks (plain data parallelism; the DeepSpeed engine does this itself)."""
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= world_size


def broadcast_buffers(module: torch.nn.Module) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics) to every rank, as DDP does before each forward: each
    rank's batches would otherwise drift its statistics apart, and frozen BatchNorm (eval mode) would then compute
    different functions on different ranks, and a resume (from rank 0's checkpoint) would not reproduce rank 1."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for b in module.buffers():
        by_dtype.setdefault(b.dtype, []).append(b)
    for bufs in by_dtype.values():
        flat = torch._utils._flatten_dense_tensors([b.detach() for b in bufs])
        dist.broadcast(flat, src=0)
        for b, v in zip(bufs, torch._utils._unflatten_dense_tensors(flat, bufs), strict=True):
            b.copy_(v)


def mean_across_ranks(value: float) -> float:
    """The mean of a scalar over all ranks (the value itself on one process)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    t = torch.tensor([float(value)], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t) / dist.get_world_size()


def teardown() -> None:
    """Leave the process group this module created (one that Ray Train set up is Ray's to destroy)."""
    global _OWN_GROUP
    if dist.is_initialized():
        dist.barrier()
        if _OWN_GROUP:
            # DeepSpeed, when it ran here, keeps references to the group: its own destroy releases them, or the next
            # engine in this process (the bench's next cell) would use the destroyed group
            ds_comm = sys.modules.get("deepspeed.comm")
            if ds_comm is not None and ds_comm.is_initialized():
                ds_comm.destroy_process_group()
            else:
                dist.destroy_process_group()
            _OWN_GROUP = False
