"""The plain torch engine: the optimizer as built, gradients averaged over ranks by a bucketed all-reduce overlapped
with backward when there is more than one process (:class:`pst_dist.distributed.GradBuckets`; the model stays
unwrapped); its checkpoint is one file, ``<run_dir>/checkpoint.pt``, written by rank 0."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from ..checkpoint import CheckpointError, load_checkpoint, load_mapped, save_checkpoint
from ..distributed import GradBuckets
from ..io import load_failure
from ..pst.freeze import drop_frozen_grads
from .base import Engine

CHECKPOINT = "checkpoint.pt"


class TorchEngine(Engine):
    """Plain torch: the optimizer as built; with more than one process, gradients averaged over ranks in buckets of
    about ``bucket_mb`` MiB, each all-reduced as soon as backward has produced all of its gradients."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, world_size: int,
                 bucket_mb: float = 25.0):
        self.module, self.optimizer, self.world_size = model, optimizer, world_size
        self.grad_sync = GradBuckets(model, optimizer, world_size, int(bucket_mb * 2**20)) if world_size > 1 else None

    def backward(self, loss: torch.Tensor, mults: tuple[float, ...] | None = None) -> None:
        """``mults`` (the stage's lr multipliers) arm the buckets so that all-reduces overlap backward; without
        them the gradients are all-reduced after backward, in :meth:`step`."""
        self.optimizer.zero_grad(set_to_none=True)
        if self.grad_sync is not None and mults is not None:
            self.grad_sync.arm(mults)
        loss.backward()

    def step(self, mults: tuple[float, ...]) -> None:
        drop_frozen_grads(self.optimizer, mults)
        if self.grad_sync is not None:
            self.grad_sync.finish(mults)
        self.optimizer.step()

    def gathered(self):
        return contextlib.nullcontext()

    def module_changed(self) -> None:
        """Parameters were modified in place (head re-init): nothing to resynchronise here."""

    def save(self, run_dir: Path, state: dict, model_name: str, is_primary: bool) -> None:
        if is_primary:
            save_checkpoint(run_dir / CHECKPOINT, self.module, self.optimizer, state, model_name)

    def load(self, run_dir: Path, model_name: str) -> dict:
        return load_checkpoint(run_dir / CHECKPOINT, self.module, self.optimizer, model_name)

    # ---- the checkpoint layout

    @classmethod
    def has_checkpoint(cls, run_dir: Path) -> bool:
        return (Path(run_dir) / CHECKPOINT).is_file()

    @classmethod
    def checkpoint_files(cls, run_dir: Path, primary: bool = True) -> list[Path]:
        return [Path(CHECKPOINT)] if primary and cls.has_checkpoint(run_dir) else []

    @classmethod
    def checkpoint_epoch(cls, run_dir: Path) -> int | None:
        if not cls.has_checkpoint(run_dir):
            return None
        path = Path(run_dir) / CHECKPOINT
        try:  # memory-mapped: only the trainer state is read
            payload = load_mapped(path)
            return int(payload["state"]["epoch"])
        except Exception as e:  # noqa: BLE001 - any unpickling failure or missing key is a bad file
            raise CheckpointError(f"{path}: not a readable pst-dist checkpoint ({load_failure(e)})") from None
