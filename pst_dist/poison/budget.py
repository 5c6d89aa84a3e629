"""What every attack and every poison reader shares: the error for a poison that does not fit, measured
perturbation norms, and the budgets they are checked against."""

from __future__ import annotations

import math

import torch

from ..config import ConfigError, PoisonConfig


class PoisonFileError(ValueError):
    """An imported poison does not fit the data set; the message names the expected and found values."""


def norms(clean: torch.Tensor, poisoned: torch.Tensor) -> dict[str, float]:
    """Measured perturbation norms, in [0, 1] pixel units (L0: changed pixel positions per image)."""
    d = poisoned.to(torch.int16) - clean.to(torch.int16)
    if not len(d):
        return {"linf": 0.0, "l2_mean": 0.0, "l2_max": 0.0, "l0_mean": 0.0}
    l2 = (d.double() / 255).flatten(1).norm(dim=1)
    l0 = (d != 0).any(dim=1).flatten(1).sum(1).double()
    return {"linf": float(d.abs().max()) / 255, "l2_mean": float(l2.mean()), "l2_max": float(l2.max()),
            "l0_mean": float(l0.mean())}


def l2_budget(cfg: PoisonConfig, shape: tuple[int, int, int]) -> float:
    """The per-image L2 budget in [0, 1] pixel units: poison.l2, or scaled from the CIFAR reference (3 x 32 x 32):
    LSP 6/255 * sqrt(3072) (APBench), AR 1.0."""
    if cfg.l2 > 0:
        return cfg.l2
    dims = math.prod(shape)
    return 6 / 255 * math.sqrt(dims) if cfg.kind == "lsp" else math.sqrt(dims / 3072)


def linf_levels(eps: float) -> int:
    """The whole pixel levels an L-inf budget ``eps`` ([0, 1] units) allows: rounded down, so that no perturbation
    exceeds poison.eps (8.59/255 allows 8), with a tolerance of 0.02 level for an eps written short (0.0627 is
    15.99/255: 16). Every attack and every check of a stored or imported poison uses it."""
    return math.floor(eps * 255 + 0.02)


def attack_levels(cfg: PoisonConfig) -> int:
    """:func:`linf_levels` of an L-inf attack's poison.eps; ConfigError when that is no whole pixel level (the attack
    would write the clean images as its poison)."""
    levels = linf_levels(cfg.eps)
    if levels < 1:
        raise ConfigError(f"poison.eps={cfg.eps} is below one pixel level (1/255): poison.kind={cfg.kind!r} "
                          f"adds whole pixel levels")
    return levels


def check_linf(images: torch.Tensor, out: torch.Tensor, eps: float, name: str) -> None:
    """Assert that ``out`` stays within L-inf ``eps`` (in [0, 1] units, as :func:`linf_levels`) of ``images``."""
    budget = linf_levels(eps)
    linf = int((out.to(torch.int16) - images.to(torch.int16)).abs().max()) if len(out) else 0
    assert linf <= budget, f"{name}: L-inf {linf}/255 exceeds its budget {budget}/255"
