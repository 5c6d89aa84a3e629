"""Partial poisoning (``poison.ratio``): which training images are poisoned, the others left clean.

The rule: the k = round(ratio * n) images of the n in the training split that come first in a permutation of the
source's training rows drawn from ``poison.seed``. It depends on the seed and on which source rows the split holds,
not on their order: the same training split gets the same poisoned rows whatever data.seed shuffled, another seed
other rows, and a larger ratio poisons a superset."""

from __future__ import annotations

import torch

from ..config import ConfigError, PoisonConfig


def poisoned_mask(index: torch.Tensor, source_size: int, ratio: float, seed: int) -> torch.Tensor:
    """Bool per image of a training split (``index``: its rows in the source's training split of ``source_size``):
    True for the poisoned ones."""
    n = len(index)
    if ratio >= 1:
        return torch.ones(n, dtype=torch.bool)
    k = round(ratio * n)
    if k == 0:
        raise ConfigError(f"poison.ratio={ratio} poisons none of the {n} training images (round(ratio * n) = 0); "
                          f"raise it")
    rank = torch.randperm(source_size, generator=torch.Generator().manual_seed(seed)).argsort()  # row -> position
    mask = torch.zeros(n, dtype=torch.bool)
    mask[torch.argsort(rank[index])[:k]] = True
    return mask


def mix_clean(poisoned: torch.Tensor, clean: torch.Tensor, index: torch.Tensor, source_size: int,
              cfg: PoisonConfig) -> tuple[torch.Tensor, int]:
    """(``poisoned`` where :func:`poisoned_mask` says so, ``clean`` elsewhere; how many are poisoned)."""
    if cfg.ratio >= 1 or cfg.kind == "none":
        return poisoned, len(poisoned)
    mask = poisoned_mask(index, source_size, cfg.ratio, cfg.seed)
    return torch.where(mask.view(-1, 1, 1, 1), poisoned, clean), int(mask.sum())
