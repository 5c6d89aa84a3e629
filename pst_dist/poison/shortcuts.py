"""Cheap shortcut poisons without a model, written from their published ideas: LSP (class-wise patch clusters, L2
budget), AR (class-wise autoregressive filters, sample-wise draws, L2 budget), OPS (one pixel per image, L0 = 1,
position and colour searched per class) and class-wise convolution blur (CUDA-style, no Lp bound).

Each returns poisoned uint8 images (a new tensor), deterministic from ``poison.seed``, vectorised over images, for
any channel count and size, and asserts its budget on what it returns (after rounding to pixel levels and clipping).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..config import PoisonConfig
from .budget import l2_budget, norms


def _to_pixel_levels(delta: torch.Tensor, budget: float) -> torch.Tensor:
    """Scale float perturbations (rows = images or classes) to L2 = budget, round to integer pixel levels and shrink
    any row whose rounding pushed it over the budget. Returns int16 in 1/255 units."""
    flat = delta.flatten(1)
    flat = flat * (budget * 255 / flat.norm(dim=1, keepdim=True).clamp_min(1e-12))
    for _ in range(50):
        out = flat.round()
        over = out.norm(dim=1) > budget * 255
        if not bool(over.any()):
            return out.to(torch.int16).view_as(delta)
        flat[over] *= 0.99
    raise AssertionError("could not round the perturbation within its L2 budget")


def _add(images: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    return (images.to(torch.int16) + delta).clamp(0, 255).to(torch.uint8)


def _check_l2(images: torch.Tensor, out: torch.Tensor, budget: float, name: str) -> None:
    l2 = norms(images, out)["l2_max"]
    assert l2 <= budget + 1e-6, f"{name}: per-image L2 {l2:.4f} exceeds its budget {budget:.4f}"


def lsp(images: torch.Tensor, labels: torch.Tensor, cfg: PoisonConfig, num_classes: int) -> torch.Tensor:
    """Linear-separable synthetic patches: per class, a grid of ``patch_size`` patches, each a constant drawn from a
    class-specific Gaussian (a cluster per class), scaled to the L2 budget; the same pattern on every image of the
    class."""
    c, h, w = images.shape[1:]
    g = torch.Generator().manual_seed(cfg.seed)
    p = cfg.patch_size
    gh, gw = math.ceil(h / p), math.ceil(w / p)
    centres = torch.randn(num_classes, c, 1, 1, generator=g)  # the cluster each class's patches are drawn around
    grid = centres + 0.5 * torch.randn(num_classes, c, gh, gw, generator=g)
    pattern = grid.repeat_interleave(p, 2).repeat_interleave(p, 3)[:, :, :h, :w]
    budget = l2_budget(cfg, (c, h, w))
    out = _add(images, _to_pixel_levels(pattern, budget)[labels])
    _check_l2(images, out, budget, "lsp")
    return out


def ar_filters(cfg: PoisonConfig, num_classes: int, channels: int) -> torch.Tensor:
    """One causal 3x3 autoregressive filter per class and channel: weights on the left, upper-left, upper and
    upper-right neighbours, random signs and sizes, scaled to an absolute sum of 0.95 (a stable process)."""
    g = torch.Generator().manual_seed(cfg.seed + 7919)
    a = torch.rand(num_classes, channels, 4, generator=g) * 2 - 1
    return 0.95 * a / a.abs().sum(dim=2, keepdim=True)


def ar(images: torch.Tensor, labels: torch.Tensor, cfg: PoisonConfig, num_classes: int) -> torch.Tensor:
    """Autoregressive perturbations: every image gets its own realisation of its class's AR process, scaled to the
    L2 budget. The process runs pixel by pixel in raster order, vectorised over images and channels."""
    n, c, h, w = images.shape
    coef = ar_filters(cfg, num_classes, c)[labels]  # n x c x 4
    g = torch.Generator().manual_seed(cfg.seed)
    x = torch.zeros(n, c, h + 1, w + 2)  # a zero border above and on both sides
    x[:, :, 1:, 1:-1] = torch.randn(n, c, h, w, generator=g)  # innovations; the recursion adds the filtered past
    for i in range(1, h + 1):
        for j in range(1, w + 1):
            past = torch.stack([x[:, :, i, j - 1], x[:, :, i - 1, j - 1], x[:, :, i - 1, j], x[:, :, i - 1, j + 1]], -1)
            x[:, :, i, j] += (coef * past).sum(-1)
    budget = l2_budget(cfg, (c, h, w))
    out = _add(images, _to_pixel_levels(x[:, :, 1:, 1:-1], budget))
    _check_l2(images, out, budget, "ar")
    return out


def ops_targets(images: torch.Tensor, labels: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per class, the pixel position and extreme colour (each channel 0 or 255) that change the class's images the
    most and most uniformly: score = mean |x - colour| / (1 + std over the class's pixel values), positions not
    shared between classes. Returns (positions: K, colours: K x C uint8)."""
    n, c, h, w = images.shape
    colours = torch.tensor([[(v >> b) & 1 for b in range(c)] for v in range(2 ** c)], dtype=torch.float32) * 255
    x = images.float().flatten(2)  # n x c x hw
    positions, chosen = torch.zeros(num_classes, dtype=torch.long), torch.zeros(num_classes, c, dtype=torch.uint8)
    taken: set[int] = set()
    for k in range(num_classes):
        xk = x[labels == k]
        if len(xk) == 0:
            xk = x
        spread = xk.std(dim=0, unbiased=False).mean(0) if len(xk) > 1 else torch.zeros(h * w)  # hw
        dev = (xk.mean(0)[None] - colours[:, :, None]).abs().mean(1)  # colours x hw (mean |pixel - colour|)
        score = dev / (1 + spread)[None]
        if taken:
            score[:, list(taken)] = -1
        best = int(score.argmax())
        v, pos = divmod(best, h * w)
        positions[k], chosen[k] = pos, colours[v].to(torch.uint8)
        taken.add(pos)
    return positions, chosen


def ops(images: torch.Tensor, labels: torch.Tensor, cfg: PoisonConfig, num_classes: int) -> torch.Tensor:
    """One-pixel shortcut: each image's class pixel set to its class colour (L0 = 1)."""
    n, c, h, w = images.shape
    positions, colours = ops_targets(images, labels, num_classes)
    out = images.clone().flatten(2)
    out[torch.arange(n), :, positions[labels]] = colours[labels]
    out = out.view(n, c, h, w)
    l0 = int((out != images).any(dim=1).flatten(1).sum(1).max()) if n else 0
    assert l0 <= 1, f"ops: {l0} pixels changed in one image, budget L0 = 1"
    return out


def blur_kernels(cfg: PoisonConfig, num_classes: int) -> torch.Tensor:
    """One random non-negative kernel per class (side poison.blur_kernel), summing to 1, centre weighted up so the
    image stays recognisable."""
    g = torch.Generator().manual_seed(cfg.seed + 104729)
    k = cfg.blur_kernel
    ker = torch.rand(num_classes, k, k, generator=g)
    ker[:, k // 2, k // 2] += 1.0
    return ker / ker.sum(dim=(1, 2), keepdim=True)


def conv_blur(images: torch.Tensor, labels: torch.Tensor, cfg: PoisonConfig, num_classes: int) -> torch.Tensor:
    """Class-wise convolution: every image convolved (per channel, reflect padding) with its class's kernel."""
    n, c, h, w = images.shape
    ker = blur_kernels(cfg, num_classes)
    out = torch.empty_like(images)
    pad = cfg.blur_kernel // 2
    for k in range(num_classes):  # one grouped convolution per class, over all its images
        idx = (labels == k).nonzero().flatten()
        if len(idx) == 0:
            continue
        x = F.pad(images[idx].float(), (pad, pad, pad, pad), mode="reflect" if min(h, w) > pad else "replicate")
        weight = ker[k].expand(c, 1, -1, -1)
        out[idx] = F.conv2d(x, weight, groups=c).round().clamp(0, 255).to(torch.uint8)
    return out
