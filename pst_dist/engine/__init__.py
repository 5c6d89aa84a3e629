"""Training engines: the trainer talks to one of these, torch or DeepSpeed (``[deepspeed] enabled``). PST freezing
is the same for both (one param group per layer group, lr and weight decay 0 while frozen, no backward through the
frozen prefix), so it holds under every ZeRO stage.

Each engine class owns its checkpoint layout (:class:`Engine`): the bench, Tune and anything else that looks at a
run directory asks :func:`engine_class` of the run's config whether it holds a checkpoint, which files make it up and
at which epoch it was taken, instead of knowing file names.
"""

from __future__ import annotations

import torch

from ..distributed import DistInfo
from .base import Engine
from .deepspeed import DS_SAFE_GLOBALS, DeepSpeedEngine, check_ds_checkpoint, deepspeed_config
from .torch import TorchEngine


def engine_class(cfg) -> type[TorchEngine] | type[DeepSpeedEngine]:
    """The engine a config trains with (its class: checkpoint questions need no engine built)."""
    return DeepSpeedEngine if cfg.deepspeed.enabled else TorchEngine


def build_engine(cfg, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 info: DistInfo) -> TorchEngine | DeepSpeedEngine:
    if cfg.deepspeed.enabled:
        return DeepSpeedEngine(cfg, model, optimizer, info)
    return TorchEngine(model, optimizer, info.world_size)


__all__ = ["DS_SAFE_GLOBALS", "DeepSpeedEngine", "Engine", "TorchEngine", "build_engine", "check_ds_checkpoint",
           "deepspeed_config", "engine_class"]
