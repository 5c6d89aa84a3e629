"""Availability poisons (unlearnable examples): the attacks named in :data:`pst_dist.registry.ATTACKS`, and
poisons imported from files."""

from __future__ import annotations

import torch

from ..config import Config, ConfigError, PoisonConfig
from ..registry import ATTACKS
from .budget import PoisonFileError, attack_levels, norms
from .cheap import apply_poison, class_patterns
from .imported import import_poison
from .partial import mix_clean, poisoned_mask


def make_poison(images: torch.Tensor, labels: torch.Tensor, index: torch.Tensor, source_size: int,
                cfg: PoisonConfig, num_classes: int, full: Config | None = None) -> tuple[torch.Tensor, dict]:
    """(poisoned uint8 copy of a training split, every image poisoned, what the attack did: e.g. a surrogate's rounds
    and error, for poison.json). ``index``: rows in the source's split of ``source_size``. The model-based attacks
    need the whole config ``full`` (surrogate model, device, precision). ``poison.ratio`` is applied after, by
    :func:`mix_clean`."""
    if cfg.kind == "file":
        return import_poison(images, index, source_size, cfg, labels, num_classes=num_classes,
                             verify=full is None or full.data.verify), {}
    if cfg.kind == "none":  # the clean images themselves, not a second copy: nothing writes into a training split
        return images, {}
    entry = ATTACKS.entry(cfg.kind)
    if entry.data.get("budget") == "linf":
        attack_levels(cfg)  # before a model-based attack's minutes
    if entry.kind == "model":
        if full is None:
            raise ValueError(f"poison.kind={cfg.kind!r} needs the whole config (its surrogate model and device)")
        devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices):  # its surrogate seeds torch: the run's own draws (the model's
            out, info = ATTACKS.load(cfg.kind)(images, labels, full, num_classes)  # init) stay train.seed's
    else:
        out, info = ATTACKS.load(cfg.kind)(images, labels, cfg, num_classes), {}
    if len(images) and torch.equal(out, images):  # e.g. an L2 budget below half a pixel level in every pixel
        raise ConfigError(f"poison.kind={cfg.kind!r} changed no pixel of the {len(images)} training images: its "
                          f"budget ({_budget_of(cfg)}) rounds to nothing in whole pixel levels; raise it")
    return out, info


def _budget_of(cfg: PoisonConfig) -> str:
    entry = ATTACKS.entry(cfg.kind)
    budget = entry.data.get("budget")
    if entry.kind == "model":  # its noise starts at 0 (TAP) and moves by step_size: both may be too small
        return f"poison.eps={cfg.eps:g}, poison.step_size={cfg.step_size:g} x poison.steps={cfg.steps}"
    if budget == "linf":
        return f"poison.eps={cfg.eps:g}"
    if budget == "l2":
        return f"poison.l2={cfg.l2:g}" if cfg.l2 > 0 else "poison.l2 for this image size"
    return f"poison.blur_kernel={cfg.blur_kernel}" if cfg.kind == "conv_blur" else "its settings"


def poison_train(images: torch.Tensor, labels: torch.Tensor, index: torch.Tensor, source_size: int,
                 cfg: PoisonConfig, num_classes: int, full: Config | None = None) -> torch.Tensor:
    """The poisoned images of :func:`make_poison` alone."""
    return make_poison(images, labels, index, source_size, cfg, num_classes, full)[0]


__all__ = ["PoisonFileError", "apply_poison", "class_patterns", "import_poison", "make_poison", "mix_clean", "norms",
           "poison_train", "poisoned_mask"]
