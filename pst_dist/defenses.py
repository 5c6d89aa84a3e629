"""Baseline defenses applied to the (poisoned) training images before training: ISS image shortcut squeezing
(JPEG at a low quality, grayscale). The clean validation and test images are never touched."""

from __future__ import annotations

import torch
from torchvision.io import decode_jpeg, encode_jpeg
from torchvision.transforms.functional import rgb_to_grayscale

from .config import DefenseConfig


def jpeg(images: torch.Tensor, quality: int) -> torch.Tensor:
    """Every image through JPEG at ``quality`` and back (uint8 N x C x H x W, C = 1 or 3)."""
    if not len(images):
        return images.clone()
    return torch.stack(decode_jpeg(encode_jpeg(list(images.contiguous()), quality=quality)))


def grayscale(images: torch.Tensor) -> torch.Tensor:
    """Luma, repeated over the channels (identity on 1-channel data)."""
    if images.shape[1] == 1:
        return images.clone()
    return rgb_to_grayscale(images, num_output_channels=images.shape[1])


def squeeze_train(images: torch.Tensor, cfg: DefenseConfig) -> torch.Tensor:
    if cfg.kind == "jpeg":
        return jpeg(images, cfg.jpeg_quality)
    if cfg.kind == "grayscale":
        return grayscale(images)
    return images
