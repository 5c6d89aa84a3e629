"""Cheap shortcut poisons without a model, written from their published ideas: LSP (class-wise patch clusters, L2
budget), AR (class-wise autoregressive filters, sample-wise draws, L2 budget), OPS (one pixel per image, L0 = 1,
position and colour searched per class) and class-wise convolution blur (CUDA-style, no Lp bound).

Each returns poisoned uint8 images (a new tensor), deterministic from ``poison.seed``, vectorised over images, for
any channel count and size, and asserts its budget on what it returns (after rounding to pixel levels and clipping).
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from ..config import PoisonConfig
from .budget import CHUNK_VALUES, add_levels, l2_budget, norms


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
    levels = _to_pixel_levels(pattern, budget)  # one per class
    out = add_levels(images, lambda rows: levels[labels[rows]])
    _check_l2(images, out, budget, "lsp")
    return out


AR_CROP = 4
"""Rows and columns cut from the top-left of each AR draw: where its random start lies (the paper: 36 -> 32 px)."""
AR_CANDIDATES, AR_SCREENED = 4096, 256
"""Stable candidate filters drawn per channel count, and how many of them (those most responsive to the others'
filters) the class filters are chosen from."""
AR_STABLE_RMS = 50 / math.sqrt(3072)
"""A candidate is stable when three draws at 32 x 32 stay within this RMS per pixel (the paper: L2 <= 50 on
3 x 32 x 32, from a unit Gaussian start)."""


def _ar_process(coef: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
    """The causal AR recursion on ``start`` (... x H x W): from the third row and column on, each pixel becomes the
    sum of its 3 x 3 window (the pixel at the bottom-right, weight 0) weighted by ``coef`` (... x 3 x 3); the first
    two rows and columns keep ``start``. No innovations: the matching filter maps the result to exactly zero."""
    x = start.movedim((-2, -1), (0, 1)).contiguous()  # H x W x ...: each window is a few contiguous rows
    k = coef.movedim((-2, -1), (0, 1))
    h, w = x.shape[:2]
    for i in range(2, h):
        for j in range(2, w):
            x[i, j] = (k * x[i - 2:i + 1, j - 2:j + 1]).sum((0, 1))
    return x.movedim((0, 1), (-2, -1))


def _ar_responses(draws: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    """draw x filter: the ReLU-summed output of each AR filter (``coef`` with -1 on the pixel itself, summed over
    channels) on each draw: 0 for a filter on its own process's draws, large when it does not whiten them."""
    match = coef.clone()
    match[..., 2, 2] = -1
    return torch.cat([F.relu(F.conv2d(d, match)).sum((-2, -1)) for d in draws.split(64)])


def ar_filters(cfg: PoisonConfig, num_classes: int, channels: int) -> torch.Tensor:
    """The class filters for ``poison.seed`` (see :func:`_ar_filters`; computed once per seed and shape)."""
    return _ar_filters(cfg.seed, num_classes, channels).clone()


@functools.lru_cache(maxsize=8)
def _ar_filters(seed: int, num_classes: int, channels: int) -> torch.Tensor:
    """One causal 3 x 3 AR filter per class and channel (num_classes x channels x 3 x 3, the bottom-right weight 0),
    drawn as the paper draws them: Gaussian weights divided by their sum, kept if three draws (per channel, 32 x 32,
    Gaussian start) stay bounded. Then chosen to be distinct as the paper's search wants (every earlier class's filter
    responds strongly to the new class's draws, see :func:`_ar_responses`; the paper accepts the next of up to a
    million candidates whose lowest response is >= 10, at unit L2 on 32 x 32): of ``AR_CANDIDATES`` stable
    candidates, the ``AR_SCREENED`` whose draws respond most to the first 16 filters, then greedily the candidate
    with the highest lowest response."""
    g = torch.Generator().manual_seed(seed + 7919)
    side, need = 32 + AR_CROP, AR_CANDIDATES * channels
    kept: list[torch.Tensor] = []
    while sum(len(k) for k in kept) < need:  # single-channel candidates (the channels are independent processes)
        cand = torch.randn(4096, 3, 3, generator=g)
        cand[:, 2, 2] = 0
        cand = cand / cand.sum((1, 2), keepdim=True)
        stable = torch.ones(len(cand), dtype=torch.bool)
        for _ in range(3):
            idx = stable.nonzero().flatten()
            draw = _ar_process(cand[idx], torch.randn(len(idx), side, side, generator=g))[:, AR_CROP:, AR_CROP:]
            rms = draw.flatten(1).norm(dim=1) / (side - AR_CROP)
            stable[idx] = rms.isfinite() & (rms <= AR_STABLE_RMS)
        kept.append(cand[stable])
    pool = torch.cat(kept)[:need].view(AR_CANDIDATES, channels, 3, 3)
    draws = _ar_process(pool, torch.randn(AR_CANDIDATES, channels, side, side, generator=g))[..., AR_CROP:, AR_CROP:]
    draws = draws / draws.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    top = _ar_responses(draws, pool[:16]).min(1).values.argsort(descending=True)[:AR_SCREENED]
    pool, resp = pool[top], _ar_responses(draws[top], pool[top])
    chosen = [0]
    for _ in range(1, num_classes):
        score = resp[:, chosen].min(1).values  # the chosen filters' lowest response to each candidate's draw
        score[chosen] = -1
        chosen.append(int(score.argmax()))
    return pool[chosen]


def ar(images: torch.Tensor, labels: torch.Tensor, cfg: PoisonConfig, num_classes: int) -> torch.Tensor:
    """Autoregressive perturbations: every image gets its own draw of its class's AR process (a Gaussian start in
    the first two rows and columns of an (H + 4) x (W + 4) grid, the recursion everywhere else, the top-left 4 rows
    and columns cropped away), scaled to the L2 budget per image. Vectorised over images and channels."""
    n, c, h, w = images.shape
    coef = ar_filters(cfg, num_classes, c)
    g = torch.Generator().manual_seed(cfg.seed)
    budget = l2_budget(cfg, (c, h, w))
    levels = torch.empty(n, c, h, w, dtype=torch.int16)
    # bounded memory: 4096 draws at a time (as the draws always came), fewer where those would pass CHUNK_VALUES
    # (ImageNet-sized images), a multiple of 16 images: torch draws normals in blocks of 16 values, so calls of
    # 16k images continue the one stream 4096-image calls made; each image's draw scaled and rounded on its own
    step = min(4096, max(64, CHUNK_VALUES // (c * (h + AR_CROP) * (w + AR_CROP))))
    step -= step % 16
    for s in range(0, n, step):
        b = slice(s, s + step)
        start = torch.randn(len(labels[b]), c, h + AR_CROP, w + AR_CROP, generator=g)
        levels[b] = _to_pixel_levels(_ar_process(coef[labels[b]], start)[..., AR_CROP:, AR_CROP:], budget)
    out = add_levels(images, lambda rows: levels[rows])
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
