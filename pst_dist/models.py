"""Model factory: any timm model by name, adapted to small images (32px ResNet stem, ViT patch size)."""

from __future__ import annotations

import timm
import torch.nn as nn

from .config import ConfigError, ModelConfig


def build_model(cfg: ModelConfig, num_classes: int, in_chans: int, img_size: int) -> nn.Module:
    """Create ``cfg.name`` from timm with random weights, sized for ``img_size`` inputs."""
    if cfg.name not in timm.list_models():
        raise ConfigError(f"model.name={cfg.name!r}: not a timm model (see timm.list_models())")
    kwargs: dict = dict(pretrained=False, num_classes=num_classes, in_chans=in_chans, drop_rate=cfg.drop_rate)
    is_resnet = cfg.name.startswith(("resnet", "resnext", "wide_resnet")) and "resnetv2" not in cfg.name
    if is_resnet and cfg.width != 1.0:
        channels = tuple(max(8, int(round(c * cfg.width))) for c in (64, 128, 256, 512))
        kwargs.update(channels=channels, stem_width=channels[0])
    if cfg.name.startswith(("vit_", "deit_")):
        kwargs.update(img_size=img_size, patch_size=cfg.patch_size)
        if img_size % cfg.patch_size:
            raise ConfigError(f"model.patch_size={cfg.patch_size} does not divide the image size {img_size}")
    model = timm.create_model(cfg.name, **kwargs)
    if is_resnet and cfg.small_stem:
        _small_resnet_stem(model, in_chans, pool=cfg.stem_pool)
    return model


def _small_resnet_stem(model: nn.Module, in_chans: int, pool: bool) -> None:
    """Replace the 7x7/2 stem and max-pool by a 3x3/1 conv (the CIFAR ResNet stem), keeping module names."""
    out_ch = model.conv1.out_channels if isinstance(model.conv1, nn.Conv2d) else model.bn1.num_features
    model.conv1 = nn.Conv2d(in_chans, out_ch, kernel_size=3, stride=1, padding=1, bias=False)
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    model.bn1 = nn.BatchNorm2d(out_ch)
    model.maxpool = nn.MaxPool2d(2) if pool else nn.Identity()
