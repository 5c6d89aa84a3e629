"""Sample-wise uniform noise: a fresh +-eps pattern per image. The random-noise control of the unlearnable-examples
literature (Huang et al. 2021): as large as class-wise noise, but it carries no label information, so it is no
shortcut and should barely hurt standard training."""

from __future__ import annotations

import torch

from ..config import ConfigError, PoisonConfig
from .budget import check_linf


def samplewise_noise(images: torch.Tensor, labels: torch.Tensor, cfg: PoisonConfig, num_classes: int) -> torch.Tensor:
    """Per-pixel uniform integer noise in [-eps, eps], drawn per image from ``poison.seed`` (labels unused)."""
    amp = int(round(cfg.eps * 255))
    if amp < 1:
        raise ConfigError(f"poison.eps={cfg.eps} is below one pixel level (1/255): poison.kind={cfg.kind!r} "
                          f"adds whole pixel levels")
    g = torch.Generator().manual_seed(cfg.seed)
    delta = torch.randint(-amp, amp + 1, tuple(images.shape), generator=g, dtype=torch.int16)
    out = (images.to(torch.int16) + delta).clamp(0, 255).to(torch.uint8)
    check_linf(images, out, cfg.eps, "samplewise_noise")
    return out
