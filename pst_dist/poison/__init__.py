"""Availability poisons (unlearnable examples): the cheap class-wise ones, and poisons imported from files."""

from __future__ import annotations

import torch

from ..config import MODEL_POISONS, Config, PoisonConfig
from .cheap import apply_poison, class_patterns
from .imported import PoisonFileError, import_poison, norms


def poison_train(images: torch.Tensor, labels: torch.Tensor, index: torch.Tensor, source_size: int,
                 cfg: PoisonConfig, num_classes: int, full: Config | None = None) -> torch.Tensor:
    """Poisoned uint8 copy of a training split (``index``: rows in the source's split of ``source_size``).
    The model-based attacks (em, rem, tap) need the whole config ``full`` (model, device, precision)."""
    if cfg.kind == "file":
        return import_poison(images, index, source_size, cfg, labels, verify=full is None or full.data.verify)
    if cfg.kind in MODEL_POISONS:
        from .model_based import ATTACKS

        if full is None:
            raise ValueError(f"poison.kind={cfg.kind!r} needs the whole config (its surrogate model and device)")
        return ATTACKS[cfg.kind](images, labels, full, num_classes)
    return apply_poison(images, labels, cfg, num_classes)


__all__ = ["PoisonFileError", "apply_poison", "class_patterns", "import_poison", "norms", "poison_train"]
