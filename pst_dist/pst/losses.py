"""Per-stage loss terms: cross-entropy on the raw batch and on a perturbation-suppressing view, a consistency term
between them, and a penalty on a group's activation clustering."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torchvision.transforms import v2

from ..config import LossConfig
from .detectors import scatter_ratio
from .freeze import GroupActivations, GroupedModel
from .views import apply_view


@functools.lru_cache(maxsize=8)
def _mixer(kind: str, alpha: float, num_classes: int) -> v2.Transform:
    """torchvision's MixUp or CutMix, built once per (kind, alpha, classes): each draws only when called."""
    return {"mixup": v2.MixUp, "cutmix": v2.CutMix}[kind](alpha=alpha, num_classes=num_classes)


def mix_batch(x: torch.Tensor, y: torch.Tensor, kind: str, alpha: float, num_classes: int,
              seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``loss.mix`` of a float batch: (mixed images, mixed one-hot labels) by torchvision's MixUp or CutMix, each
    image with its neighbour in the batch; the draws (weight, box) from ``seed`` on the CPU's generator, so a step's
    mix is a function of its seed and nothing waits for the device. Every global generator (the CPU's, the GPUs')
    is as it was before."""
    op = _mixer(kind, alpha, num_classes)
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(seed)  # not torch.manual_seed: that reseeds every GPU's too
        return op(x, y)


def stage_loss(gm: GroupedModel, x: torch.Tensor, y: torch.Tensor, cfg: LossConfig, normalize, num_classes: int,
               autocast) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Loss of one batch (``x`` float in [0, 1]). Returns (loss, logits of the raw batch, parts for logging: detached
    0-d tensors on the device, read by the caller only where it logs, so a step never waits for the device)."""
    model = gm.model
    parts: dict[str, torch.Tensor] = {}
    total = torch.zeros((), device=x.device)
    need_view = cfg.view_ce > 0 or cfg.consistency > 0
    with autocast():
        if cfg.cluster_penalty > 0:
            with GroupActivations(gm, [cfg.cluster_group], detach=False) as ga:
                logits = model(normalize(x))
            pen = scatter_ratio(ga.acts[cfg.cluster_group], y, num_classes)
            total = total + cfg.cluster_penalty * pen
            parts["loss/cluster_penalty"] = pen.detach()
        else:
            logits = model(normalize(x))
        if cfg.ce > 0:
            ce = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
            total = total + cfg.ce * ce
            parts["loss/ce"] = ce.detach()
        if need_view:
            v_logits = model(normalize(apply_view(x, cfg.view, cfg.view_strength)))
            if cfg.view_ce > 0:
                vce = F.cross_entropy(v_logits.float(), y, label_smoothing=cfg.label_smoothing)
                total = total + cfg.view_ce * vce
                parts["loss/view_ce"] = vce.detach()
            if cfg.consistency > 0:
                target = F.softmax(v_logits.float().detach(), 1)
                cons = F.kl_div(F.log_softmax(logits.float(), 1), target, reduction="batchmean")
                total = total + cfg.consistency * cons
                parts["loss/consistency"] = cons.detach()
    return total, logits, parts
