"""What every engine offers the trainer, and the checkpoint layout each one owns in a run directory.

An engine instance trains (``backward``, ``step``, ``gathered``, ``module_changed``) and saves / loads its own
checkpoint. Its class answers, without building an engine (the bench, a Tune driver or worker), what a run directory
holds: :meth:`Engine.has_checkpoint`, :meth:`Engine.checkpoint_files` (what to copy to restore the run elsewhere),
:meth:`Engine.checkpoint_epoch`, and copies a checkpoint out of (:meth:`Engine.copy_checkpoint`) or back into
(:meth:`Engine.restore_checkpoint`) a run directory. Nothing outside ``pst_dist.engine`` knows the file names.
"""

from __future__ import annotations

import os
import shutil
from contextlib import AbstractContextManager
from pathlib import Path

import torch

from ..checkpoint import CheckpointError


class Engine:
    """The interface; :class:`pst_dist.engine.torch.TorchEngine` and
    :class:`pst_dist.engine.deepspeed.DeepSpeedEngine` implement it."""

    module: torch.nn.Module
    optimizer: torch.optim.Optimizer

    REWRITTEN_IN_PLACE: tuple[str, ...] = ()
    """Checkpoint files (relative to the run directory) the engine rewrites in place: copied, never hard-linked."""

    # ---- training (an engine instance)

    def backward(self, loss: torch.Tensor, mults: tuple[float, ...] | None = None) -> None:
        """Gradients of ``loss``; ``mults`` (the stage's per-group lr multipliers, as :meth:`step` will get) let an
        engine start averaging the trainable groups' gradients over ranks while backward runs."""
        raise NotImplementedError

    def step(self, mults: tuple[float, ...]) -> None:
        raise NotImplementedError

    def gathered(self) -> AbstractContextManager:
        """Full parameters on every rank inside (modifications kept)."""
        raise NotImplementedError

    def module_changed(self) -> None:
        """Parameters were modified in place (head re-init)."""
        raise NotImplementedError

    def save(self, run_dir: Path, state: dict, model_name: str, is_primary: bool) -> None:
        """Checkpoint model, optimizer, RNG and the trainer ``state`` into ``run_dir`` (every rank calls it)."""
        raise NotImplementedError

    def load(self, run_dir: Path, model_name: str) -> dict:
        """Restore the newest checkpoint in ``run_dir``; returns the trainer state saved with it."""
        raise NotImplementedError

    # ---- the checkpoint layout (the class, no engine built)

    @classmethod
    def has_checkpoint(cls, run_dir: Path) -> bool:
        """Whether ``run_dir`` holds a checkpoint of this engine to resume from."""
        raise NotImplementedError

    @classmethod
    def checkpoint_files(cls, run_dir: Path, primary: bool = True) -> list[Path]:
        """The files of the newest checkpoint in ``run_dir``, relative to it: what to copy (to the same relative
        paths) to restore the run elsewhere. ``primary=False``: only the share a process other than rank 0 holds
        on its own node (what it uploads when nodes do not share a file system). Empty when there is none."""
        raise NotImplementedError

    @classmethod
    def checkpoint_epoch(cls, run_dir: Path) -> int | None:
        """The epoch the newest checkpoint in ``run_dir`` (a run directory, or a copy of its checkpoint files) was
        taken at; None when it holds none. CheckpointError for an unreadable one."""
        raise NotImplementedError

    @classmethod
    def clear_checkpoint(cls, run_dir: Path) -> None:
        """Remove what a restored checkpoint would leave stale in ``run_dir`` (nothing, unless the engine keeps
        several)."""

    @classmethod
    def copy_checkpoint(cls, run_dir: Path, dest: Path, primary: bool = True) -> list[Path]:
        """Copy :meth:`checkpoint_files` into ``dest`` at the same relative paths (hard links, but for the files
        rewritten in place); returns them, empty (and ``dest`` untouched) when there is no checkpoint."""
        files = cls.checkpoint_files(run_dir, primary)
        for rel in files:
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            if rel.as_posix() in cls.REWRITTEN_IN_PLACE:
                shutil.copy2(run_dir / rel, dest / rel)
            else:  # written once (or replaced by a rename): the link keeps this checkpoint's bytes
                os.link(run_dir / rel, dest / rel)
        return files

    @classmethod
    def restore_checkpoint(cls, src: Path, run_dir: Path) -> int:
        """Lay a copy of a run's checkpoint files (:meth:`copy_checkpoint`'s ``dest``, possibly merged over nodes)
        into ``run_dir``, replacing the checkpoint there; returns the epoch it was taken at."""
        epoch = cls.checkpoint_epoch(src)
        if epoch is None:
            raise CheckpointError(f"{src}: holds no checkpoint of the {cls.__name__} to restore")
        cls.clear_checkpoint(run_dir)
        for rel in cls.checkpoint_files(src):
            (run_dir / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src / rel, run_dir / rel)
        return epoch
