"""Model factory: any timm model by name, adapted to small images (32px ResNet stem, ViT patch size).

The adaptations are per model family (:data:`pst_dist.registry.MODEL_FAMILIES`): a family's function returns the
extra ``timm.create_model`` kwargs and a hook run on the created model (or None). A name of no family is created
with timm's defaults.

A model written by ``pst-dist export`` (a folder: model.safetensors and a timm config.json) comes back with
:func:`load_exported`, hook included. A model without a hook (``plain_timm`` true in the config's ``pst_dist`` block:
ViTs, other timm models, ResNets with model.small_stem=false) is also plain timm:
``timm.create_model("local-dir:FOLDER", pretrained=True)``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import timm
import torch
import torch.nn as nn

from .config import ConfigError, ModelConfig, from_dict
from .registry import MODEL_FAMILIES

Hook = Callable[[nn.Module], None]


def build_model(cfg: ModelConfig, num_classes: int, in_chans: int, img_size: int) -> nn.Module:
    """Create ``cfg.name`` from timm with random weights, sized for ``img_size`` inputs."""
    kwargs, hook = timm_args(cfg, num_classes, in_chans, img_size)
    model = timm.create_model(cfg.name, pretrained=False, **kwargs)
    if hook is not None:
        hook(model)
    return model


def count_groups(cfg: ModelConfig) -> int:
    """The layer groups of ``cfg``'s model (:func:`pst_dist.pst.groups.layer_groups`), from a build on the meta
    device (no weights allocated: a ViT-L counts in a fraction of a second). The count depends on neither the image
    size (built at 8 patches) nor the channels or classes."""
    from .pst.groups import layer_groups  # pst.groups imports timm's grouping: only where groups are counted

    with torch.device("meta"):
        return len(layer_groups(build_model(cfg, 10, 3, 8 * cfg.patch_size), cfg.block_groups))


def timm_args(cfg: ModelConfig, num_classes: int, in_chans: int, img_size: int) -> tuple[dict, Hook | None]:
    """The ``timm.create_model`` kwargs for ``cfg`` and the hook run on the created model (None: plain timm)."""
    if cfg.name not in timm.list_models():
        raise ConfigError(f"model.name={cfg.name!r}: not a timm model (see timm.list_models())")
    kwargs: dict = dict(num_classes=num_classes, in_chans=in_chans, drop_rate=cfg.drop_rate)
    hook = None
    family = model_family(cfg.name)
    if family is not None:
        extra, hook = MODEL_FAMILIES.load(family)(cfg, in_chans, img_size)
        kwargs.update(extra)
    return kwargs, hook


def export_spec(folder: str | Path) -> dict:
    """The config.json of the folder ``pst-dist export`` wrote (ConfigError when it is not one)."""
    folder = Path(folder)
    try:
        spec = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        spec["pst_dist"]["model"], spec["pretrained_cfg"]  # noqa: B018 - every reader needs both
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{folder}: not a `pst-dist export` folder (config.json: {type(e).__name__}: {e})") from None
    return spec


def load_exported(folder: str | Path, spec: dict | None = None) -> nn.Module:
    """The model ``pst-dist export`` wrote to ``folder``, in eval mode: rebuilt from config.json (its ``pst_dist``
    block holds the run's [model] section, so the small-image hook is applied as in training) with
    model.safetensors loaded strictly. ``model.pretrained_cfg`` carries the export's input size, mean and std
    (``timm.data.resolve_model_data_config(model)`` reads them). ``spec``: the folder's :func:`export_spec`, when the
    caller has read it already."""
    from safetensors.torch import load_file  # a timm dependency

    spec = spec if spec is not None else export_spec(folder)
    inputs = spec["pretrained_cfg"]
    chans, size = inputs["input_size"][0], inputs["input_size"][1]
    model = build_model(from_dict(ModelConfig, spec["pst_dist"]["model"], "model"), spec["num_classes"], chans, size)
    model.load_state_dict(load_file(Path(folder) / "model.safetensors"))
    model.pretrained_cfg = {**model.pretrained_cfg, **inputs}
    return model.eval()


def model_family(name: str) -> str | None:
    """The :data:`~pst_dist.registry.MODEL_FAMILIES` entry whose ``prefixes`` start ``name`` and none of whose
    ``exclude`` substrings it contains; None for other models."""
    for family, entry in MODEL_FAMILIES.items():
        if name.startswith(tuple(entry.data["prefixes"])) and not any(s in name for s in entry.data.get("exclude", ())):
            return family
    return None


def resnet_kwargs(cfg: ModelConfig, in_chans: int, img_size: int) -> tuple[dict, Hook | None]:
    """model.width scales the channels (64, 128, 256, 512); model.small_stem swaps in the 3x3/1 CIFAR stem."""
    kwargs: dict = {}
    if cfg.width != 1.0:
        channels = tuple(max(8, int(round(c * cfg.width))) for c in (64, 128, 256, 512))
        kwargs.update(channels=channels, stem_width=channels[0])
    hook = None
    if cfg.small_stem:
        def hook(model: nn.Module) -> None:
            _small_resnet_stem(model, in_chans, pool=cfg.stem_pool)
    return kwargs, hook


def vit_kwargs(cfg: ModelConfig, in_chans: int, img_size: int) -> tuple[dict, Hook | None]:
    """img_size from the data, patch_size from model.patch_size (which must divide it)."""
    if img_size % cfg.patch_size:
        raise ConfigError(f"model.patch_size={cfg.patch_size} does not divide the image size {img_size}")
    return dict(img_size=img_size, patch_size=cfg.patch_size), None


def _small_resnet_stem(model: nn.Module, in_chans: int, pool: bool) -> None:
    """Replace the 7x7/2 stem and max-pool by a 3x3/1 conv (the CIFAR ResNet stem), keeping module names."""
    out_ch = model.conv1.out_channels if isinstance(model.conv1, nn.Conv2d) else model.bn1.num_features
    model.conv1 = nn.Conv2d(in_chans, out_ch, kernel_size=3, stride=1, padding=1, bias=False)
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    model.bn1 = nn.BatchNorm2d(out_ch)
    model.maxpool = nn.MaxPool2d(2) if pool else nn.Identity()
