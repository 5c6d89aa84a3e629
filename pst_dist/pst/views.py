"""Perturbation-suppressing views of a float batch in [0, 1] (N x C x H x W). Used by the shortcut-gap detector
and the view / consistency loss terms."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torchvision.transforms.functional import gaussian_blur

from ..config import parse_view
from ..registry import VIEWS


def apply_view(x: torch.Tensor, view: str, strength: float = 1.0) -> torch.Tensor:
    """Apply a view or a composition of views (see ``config.parse_view``)."""
    for name, s in parse_view(view, strength):
        x = _one_view(x, name, s)
    return x


def _one_view(x: torch.Tensor, view: str, strength: float) -> torch.Tensor:
    return VIEWS.load(view)(x, strength)  # parse_view checked the name


def blur(x: torch.Tensor, strength: float) -> torch.Tensor:
    """Gaussian, sigma = strength px."""
    k = 2 * int(3 * strength) + 1
    return gaussian_blur(x, [k, k], [strength, strength])


def downup(x: torch.Tensor, strength: float) -> torch.Tensor:
    """Average-pool by round(1 + strength), then bilinear back up."""
    f = int(round(1 + strength))
    h, w = x.shape[-2:]
    return F.interpolate(F.avg_pool2d(x, f, ceil_mode=True), size=(h, w), mode="bilinear", align_corners=False)


def gray(x: torch.Tensor, strength: float) -> torch.Tensor:
    """Channel mean (strength unused)."""
    return x.mean(1, keepdim=True).expand_as(x).contiguous()


def jpeg(x: torch.Tensor, strength: float) -> torch.Tensor:
    """JPEG at quality round(10 / strength): kornia's differentiable codec (standard tables, 4:2:0 chroma) on the
    whole batch on its device; a 1-channel image is coded as gray RGB and averaged back."""
    from kornia.enhance import jpeg_codec_differentiable  # loaded by the runs that use this view only

    q = torch.tensor([float(max(1, min(100, round(10 / strength))))], device=x.device)
    c = x.shape[1]
    if c not in (1, 3):
        raise ValueError(f"jpeg view: images with {c} channels; expected 1 or 3")
    out = jpeg_codec_differentiable(x.float().clamp(0, 1).expand(-1, 3, -1, -1), q)
    return (out if c == 3 else out.mean(1, keepdim=True)).to(x.dtype)


def median(x: torch.Tensor, strength: float) -> torch.Tensor:
    """Median over a (2 round(strength) + 1)-pixel square (kornia, reflect padding): removes isolated pixels and
    thin strokes (one-pixel and sparse patch shortcuts) and keeps edges, unlike a blur."""
    from kornia.filters import median_blur  # loaded by the runs that use this view only

    k = 2 * max(1, int(round(strength))) + 1
    return median_blur(x, (k, k))


def plasma(x: torch.Tensor, strength: float) -> torch.Tensor:
    """A random fractal brightness field per image (kornia's diamond-square plasma, roughness ~ U(0.3, 0.7), the
    range UEraser draws from), the same on every channel, scaled to +-strength/10 and added, then clipped to [0, 1]:
    a brightness pattern the poison put on every image of a class (LSP's patches) is covered by a larger random one.
    Draws from torch's global generator (seeded by the run)."""
    from kornia.contrib import diamond_square  # loaded by the runs that use this view only

    n, _, h, w = x.shape
    rough = 0.3 + 0.4 * torch.rand(n, device=x.device)
    field = diamond_square((n, 1, h, w), rough, device=x.device, dtype=torch.float32)
    field = field.clamp(0, 1)  # kornia 0.9 keeps its map in [0, 1]; an older version could overshoot it
    return (x + (2 * field - 1).to(x.dtype) * (strength / 10)).clamp(0, 1)


def sharpen(x: torch.Tensor, strength: float) -> torch.Tensor:
    """Unsharp mask: x + strength * (x - blur(x, 1 px)), clipped to [0, 1]. Brings back (at strength ~0.5) or
    amplifies (at 2) the high frequencies a blur damped: it changes a class-wise blur's signature (conv-blur's
    kernels), which a further blur leaves in place. As a trigger view against conv-blur it separated only fully
    trained models, not the warm-up's (docs/results/pst_one_recipe.md, section 32)."""
    return (x + strength * (x - blur(x, 1.0))).clamp(0, 1)


def quantize(x: torch.Tensor, strength: float) -> torch.Tensor:
    """round(2 + 6 / strength) evenly spaced levels."""
    levels = max(2, int(round(2 + 6 / strength)))
    return torch.round(x * (levels - 1)) / (levels - 1)


def random_blur(x: torch.Tensor, max_sigma: float) -> torch.Tensor:
    """Each image convolved (reflect padding) with its own rotated Gaussian: sigmas ~ U(0, max_sigma) on two axes
    at a uniform random angle. Draws from torch's global generator (seeded by the run)."""
    n, c, h, w = x.shape
    r = max(1, int(math.ceil(3 * max_sigma)))
    r = min(r, h - 1, w - 1)
    sig = (torch.rand(n, 2, device=x.device) * max_sigma).clamp_min(0.1)
    theta = torch.rand(n, device=x.device) * math.pi
    cos, sin = torch.cos(theta), torch.sin(theta)
    d = torch.arange(-r, r + 1, device=x.device, dtype=torch.float32)
    dy, dx = torch.meshgrid(d, d, indexing="ij")
    # coordinates along the two rotated axes, per image: n x k x k
    u = cos[:, None, None] * dx + sin[:, None, None] * dy
    v = -sin[:, None, None] * dx + cos[:, None, None] * dy
    ker = torch.exp(-0.5 * ((u / sig[:, 0, None, None]) ** 2 + (v / sig[:, 1, None, None]) ** 2))
    ker = ker / ker.sum(dim=(1, 2), keepdim=True)
    weight = ker.repeat_interleave(c, 0)[:, None].to(x.dtype)  # (n*c) x 1 x k x k
    xp = F.pad(x.reshape(1, n * c, h, w), (r, r, r, r), mode="reflect")
    return F.conv2d(xp, weight, groups=n * c).reshape(n, c, h, w)
