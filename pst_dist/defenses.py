"""Baseline defenses: ISS image shortcut squeezing of the (poisoned) training images before training (JPEG at a low
quality, grayscale), and the PGD examples of adversarial training. Validation and test images are never touched."""

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


def pgd_examples(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, normalize, eps: float, step: float,
                 steps: int) -> torch.Tensor:
    """L-inf PGD examples of ``x`` (floats in [0, 1]) that raise the model's cross-entropy: a uniform random start in
    the ``eps``-ball, ``steps`` signed-gradient steps of ``step``. The model's modules are in eval mode during the
    attack (BatchNorm statistics untouched) and get their own modes back after; parameter gradients are not touched."""
    modes = [m.training for m in model.modules()]
    model.eval()
    try:
        delta = (torch.rand_like(x) * 2 - 1) * eps
        for _ in range(steps):
            xa = (x + delta).clamp(0, 1).requires_grad_(True)
            loss = torch.nn.functional.cross_entropy(model(normalize(xa)).float(), y)
            (grad,) = torch.autograd.grad(loss, xa)
            delta = (delta + step * grad.sign()).clamp(-eps, eps)
    finally:
        for m, mode in zip(model.modules(), modes, strict=True):
            m.training = mode
    return (x + delta).clamp(0, 1).detach()
