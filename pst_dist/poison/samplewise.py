"""Sample-wise uniform noise: a fresh +-eps pattern per image. The random-noise control of the unlearnable-examples
literature (Huang et al. 2021): as large as class-wise noise, but it carries no label information, so it is no
shortcut and should barely hurt standard training."""

from __future__ import annotations

import torch

from ..config import PoisonConfig
from .budget import add_levels, attack_levels, check_linf


def samplewise_noise(images: torch.Tensor, labels: torch.Tensor, cfg: PoisonConfig, num_classes: int) -> torch.Tensor:
    """Per-pixel uniform integer noise in [-eps, eps], drawn per image from ``poison.seed`` (labels unused)."""
    amp = attack_levels(cfg)
    g = torch.Generator().manual_seed(cfg.seed)
    delta = torch.randint(-amp, amp + 1, tuple(images.shape), generator=g, dtype=torch.int16)
    out = add_levels(images, lambda rows: delta[rows])
    check_linf(images, out, cfg.eps, "samplewise_noise")
    return out
