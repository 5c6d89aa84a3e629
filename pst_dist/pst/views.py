"""Perturbation-suppressing views of a float batch in [0, 1] (N x C x H x W). Used by the shortcut-gap detector
and the view / consistency loss terms."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchvision.io import decode_jpeg, encode_jpeg
from torchvision.transforms.functional import gaussian_blur


def apply_view(x: torch.Tensor, view: str, strength: float = 1.0) -> torch.Tensor:
    """``blur``: Gaussian, sigma = strength px; ``downup``: average-pool by round(1 + strength) then bilinear up;
    ``gray``: channel mean; ``jpeg``: quality round(10 / strength); ``quantize``: round(2 + 6 / strength) levels."""
    if view == "blur":
        k = 2 * int(3 * strength) + 1
        return gaussian_blur(x, [k, k], [strength, strength])
    if view == "downup":
        f = int(round(1 + strength))
        h, w = x.shape[-2:]
        return F.interpolate(F.avg_pool2d(x, f, ceil_mode=True), size=(h, w), mode="bilinear", align_corners=False)
    if view == "gray":
        return x.mean(1, keepdim=True).expand_as(x).contiguous()
    if view == "jpeg":
        q = max(1, min(100, int(round(10 / strength))))
        u8 = (x.clamp(0, 1) * 255).round().to(torch.uint8).cpu()
        out = torch.stack([decode_jpeg(encode_jpeg(im, quality=q)) for im in u8])
        return out.to(x.device, x.dtype) / 255
    if view == "quantize":
        levels = max(2, int(round(2 + 6 / strength)))
        return torch.round(x * (levels - 1)) / (levels - 1)
    raise ValueError(f"unknown view {view!r}")
