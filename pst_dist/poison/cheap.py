"""Cheap class-wise poisons (no model): class-wise uniform noise and LSP-like patch noise.

Perturbations are integers in uint8 pixel units, added to uint8 images and clipped: lossless and exact.
"""

from __future__ import annotations

import math

import torch

from ..config import PoisonConfig
from ..registry import ATTACKS
from .budget import add_levels, attack_levels, check_linf


def class_patterns(cfg: PoisonConfig, num_classes: int, shape: tuple[int, int, int]) -> torch.Tensor:
    """One perturbation per class, int16 in pixel units, shape K x C x H x W, |delta| <= attack_levels(cfg)."""
    c, h, w = shape
    g = torch.Generator().manual_seed(cfg.seed)
    amp = attack_levels(cfg)
    if cfg.kind == "classwise_noise":
        delta = torch.randint(-amp, amp + 1, (num_classes, c, h, w), generator=g)
    elif cfg.kind == "patch_noise":
        p = cfg.patch_size
        gh, gw = math.ceil(h / p), math.ceil(w / p)
        signs = torch.randint(0, 2, (num_classes, c, gh, gw), generator=g) * 2 - 1
        delta = (signs * amp).repeat_interleave(p, 2).repeat_interleave(p, 3)[:, :, :h, :w]
    else:
        raise ValueError(f"poison.kind={cfg.kind!r} has no class patterns")
    return delta.to(torch.int16).contiguous()


def _class_pattern_poison(images: torch.Tensor, labels: torch.Tensor, cfg: PoisonConfig,
                          num_classes: int) -> torch.Tensor:
    delta = class_patterns(cfg, num_classes, tuple(images.shape[1:]))
    out = add_levels(images, lambda rows: delta[labels[rows]])
    check_linf(images, out, cfg.eps, cfg.kind)
    return out


def classwise_noise(images: torch.Tensor, labels: torch.Tensor, cfg: PoisonConfig, num_classes: int) -> torch.Tensor:
    """Per-pixel uniform integer noise in [-eps, eps], one pattern per class."""
    return _class_pattern_poison(images, labels, cfg, num_classes)


def patch_noise(images: torch.Tensor, labels: torch.Tensor, cfg: PoisonConfig, num_classes: int) -> torch.Tensor:
    """+-eps constant patches of side patch_size (LSP-like, L-inf), one pattern per class."""
    return _class_pattern_poison(images, labels, cfg, num_classes)


def apply_poison(images: torch.Tensor, labels: torch.Tensor, cfg: PoisonConfig, num_classes: int) -> torch.Tensor:
    """Return poisoned uint8 images (a new tensor) of a cheap attack (no model); its budget is asserted."""
    if cfg.kind == "none":
        return images.clone()

    return ATTACKS.load(cfg.kind)(images, labels, cfg, num_classes)
