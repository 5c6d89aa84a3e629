"""What every attack and every poison reader shares: the error for a poison that does not fit, measured
perturbation norms, and the budgets they are checked against."""

from __future__ import annotations

import math

import torch

from ..config import ConfigError, PoisonConfig
from ..io import PoisonFileError  # noqa: F401 - defined torch-free in io, re-exported here

CHUNK_VALUES = 1 << 24
"""Pixel values measured at a time (128 MiB as float64): the norms and L-inf checks of a whole training split (an
ImageNet-sized one: 6 GB of uint8) work chunk by chunk, never on a float copy of all of it."""


def row_chunks(n: int, per_row: int):
    """Slices of ``n`` rows of ``per_row`` values each, :data:`CHUNK_VALUES` at a time (at least 64 rows: the
    per-row reductions stay batched)."""
    rows = max(64, CHUNK_VALUES // max(1, per_row))
    return [slice(i, min(n, i + rows)) for i in range(0, n, rows)]


def chunks_of(t) -> list[slice]:
    """:func:`row_chunks` of the tensor or array ``t`` (rows x ...)."""
    return row_chunks(len(t), math.prod(t.shape[1:]))


def _diffs(clean: torch.Tensor, poisoned: torch.Tensor):
    """(rows, poisoned - clean as int16) chunk by chunk."""
    for rows in chunks_of(poisoned):
        yield rows, poisoned[rows].to(torch.int16) - clean[rows].to(torch.int16)


def add_levels(images: torch.Tensor, levels) -> torch.Tensor:
    """uint8 ``images`` plus integer pixel levels, clipped to 0..255, chunk by chunk (:func:`row_chunks`):
    ``levels(rows)`` gives the int16 levels of those rows (a class pattern indexed by their labels, or a slice of a
    per-image tensor), so no int16 copy of the whole split is made."""
    out = torch.empty_like(images)
    for rows in chunks_of(images):
        out[rows] = (images[rows].to(torch.int16) + levels(rows)).clamp(0, 255).to(torch.uint8)
    return out


def linf_of(clean: torch.Tensor, poisoned: torch.Tensor) -> int:
    """The largest change of a pixel value, in whole levels (0 for no images)."""
    return max((int(d.abs().max()) for _, d in _diffs(clean, poisoned)), default=0)


def l0_max(clean: torch.Tensor, poisoned: torch.Tensor) -> int:
    """The most pixel positions (any channel) some image changes (0 for no images)."""
    return max((int((d != 0).any(dim=1).flatten(1).sum(1).max()) for _, d in _diffs(clean, poisoned)), default=0)


def norms(clean: torch.Tensor, poisoned: torch.Tensor) -> dict[str, float]:
    """Measured perturbation norms, in [0, 1] pixel units (L0: changed pixel positions per image); per image in
    chunks (:func:`row_chunks`), the means and maxima over all of them."""
    n = len(poisoned)
    if not n:
        return {"linf": 0.0, "l2_mean": 0.0, "l2_max": 0.0, "l0_mean": 0.0}
    l2, l0, linf = torch.empty(n, dtype=torch.float64), torch.empty(n, dtype=torch.float64), 0
    for rows, d in _diffs(clean, poisoned):
        linf = max(linf, int(d.abs().max()))
        l2[rows] = (d.double() / 255).flatten(1).norm(dim=1)
        l0[rows] = (d != 0).any(dim=1).flatten(1).sum(1).double()
    return {"linf": linf / 255, "l2_mean": float(l2.mean()), "l2_max": float(l2.max()), "l0_mean": float(l0.mean())}


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
    linf = linf_of(images, out)
    assert linf <= budget, f"{name}: L-inf {linf}/255 exceeds its budget {budget}/255"
