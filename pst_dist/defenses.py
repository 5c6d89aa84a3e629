"""Baseline defenses: ISS image shortcut squeezing of the (poisoned) training images before training (JPEG at a low
quality, grayscale), the PGD examples of adversarial training, and UEraser's random views of each training batch with
its loss (the published method, as APBench implements it). Validation and test images are never touched."""

from __future__ import annotations

import functools
import hashlib
import io

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms.functional import rgb_to_grayscale

from .config import DefenseConfig, LossConfig
from .pst.freeze import eval_mode
from .pst.losses import stage_loss


def jpeg(images: torch.Tensor, quality: int) -> torch.Tensor:
    """Every image through PIL's JPEG encoder at ``quality`` and back, as ISS and APBench do (uint8 N x C x H x W,
    C = 1 or 3)."""
    out = torch.empty_like(images)
    for i, a in enumerate(images.permute(0, 2, 3, 1).cpu().numpy()):
        buf = io.BytesIO()
        Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a).save(buf, "JPEG", quality=quality)
        with Image.open(buf) as im:
            out[i] = torch.from_numpy(np.array(im)).reshape(a.shape).permute(2, 0, 1)
    return out


def grayscale(images: torch.Tensor) -> torch.Tensor:
    """Luma, repeated over the channels (identity on 1-channel data)."""
    if images.shape[1] == 1:
        return images.clone()
    return rgb_to_grayscale(images, num_output_channels=images.shape[1])


SQUEEZES = ("jpeg", "grayscale")
"""The defenses that rewrite the training images once, before training (the others act on each batch)."""


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
    with eval_mode(model):
        delta = (torch.rand_like(x) * 2 - 1) * eps
        for _ in range(steps):
            xa = (x + delta).clamp(0, 1).requires_grad_(True)
            loss = torch.nn.functional.cross_entropy(model(normalize(xa)).float(), y)
            (grad,) = torch.autograd.grad(loss, xa)
            delta = (delta + step * grad.sign()).clamp(-eps, eps)
    return (x + delta).clamp(0, 1).detach()


@functools.cache
def _ueraser_augment(device: torch.device):
    """APBench's ``UEraser`` (defense/ueraser.py), drawing its random numbers on ``device``."""
    import kornia.augmentation as K  # only UEraser runs need kornia loaded

    return K.AugmentationSequential(
        K.RandomPlasmaBrightness(roughness=(0.3, 0.7), intensity=(0.5, 1.0), same_on_batch=False, p=1.0,
                                 keepdim=True),
        K.RandomPlasmaContrast(roughness=(0.3, 0.7), p=1.0),
        K.RandomChannelShuffle(same_on_batch=False, p=0.5, keepdim=True),
        K.auto.TrivialAugment(),
    ).to(device)


def step_seed(*key: int) -> int:
    """A 63-bit seed from integers (e.g. run seed, epoch, step, rank): distinct keys give unrelated seeds."""
    return int.from_bytes(hashlib.blake2b(repr(key).encode(), digest_size=8).digest(), "little") >> 1


def ueraser_views(x: torch.Tensor, repeats: int, seed: int) -> list[torch.Tensor]:
    """``repeats`` views of the float batch ``x`` (N x C x H x W in [0, 1]) through APBench's UEraser, computed on
    ``x``'s device with kornia: plasma brightness (roughness 0.3-0.7, intensity 0.5-1), plasma contrast (roughness
    0.3-0.7), channel shuffle (p = 0.5), then TrivialAugment (one operation per view, its magnitude per image). A
    function of ``seed``: torch's generators are seeded with it for the call and put back after."""
    aug = _ueraser_augment(x.device)
    with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
        torch.random.default_generator.manual_seed(seed)
        if x.device.type == "cuda":
            with torch.cuda.device(x.device):
                torch.cuda.manual_seed(seed)
        return [aug(x) for _ in range(repeats)]


def ueraser_repeats(cfg: DefenseConfig, epoch: int) -> int:
    """Views per batch in ``epoch`` (0-based): ueraser_repeats during the first ueraser_repeat_epochs (all when 0),
    one after."""
    return cfg.ueraser_repeats if not cfg.ueraser_repeat_epochs or epoch < cfg.ueraser_repeat_epochs else 1


def ueraser_loss(gm, x: torch.Tensor, y: torch.Tensor, loss: LossConfig, normalize, num_classes: int, autocast,
                 repeats: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """UEraser's training loss on the float batch ``x`` (views from :func:`ueraser_views`). One view: the stage's
    loss on it. Several (UEraser-Max): each image's cross-entropy maximised over its views, averaged over the batch,
    with one forward pass per view in train mode, as APBench does (the config refuses other loss terms with it).
    Returns (loss, logits of the last view, parts for logging: detached 0-d device tensors)."""
    views = ueraser_views(x, repeats, seed)
    if repeats == 1:
        return stage_loss(gm, views[0], y, loss, normalize, num_classes, autocast)
    per_view = []
    with autocast():
        for v in views:
            logits = gm.model(normalize(v))
            per_view.append(F.cross_entropy(logits.float(), y, reduction="none", label_smoothing=loss.label_smoothing))
    ce = torch.stack(per_view)  # repeats x N
    worst = ce.max(0).values.mean()
    return loss.ce * worst, logits, {"loss/ce": worst.detach(), "loss/ueraser_mean_ce": ce.mean().detach()}
