"""``pst-dist export``: a run's weights (its latest checkpoint, ZeRO partitions gathered) as a folder that timm and
plain torch read: ``model.safetensors`` and a timm ``config.json`` (architecture, ``model_args`` for
``timm.create_model``, input size, mean and std in ``pretrained_cfg``, and a ``pst_dist`` block with the run's
[model] section).

- ``plain_timm`` true (no hook after ``timm.create_model``: ViTs, other timm models, ResNets with
  model.small_stem=false): ``timm.create_model("local-dir:FOLDER", pretrained=True)`` rebuilds the model, as does
  ``timm.create_model(architecture, pretrained=True, pretrained_cfg_overlay=dict(file=FOLDER/model.safetensors,
  **pretrained_cfg), **model_args)``.
- Otherwise (a ResNet with the 3x3 small-image stem, which timm cannot build): :func:`pst_dist.models.load_exported`.
  It reads any export.

The ``pst_dist`` block's ``eval_views`` are the run's test-time views (``schedule.eval_views``): the run scored the
mean softmax over the raw image and those views, which :func:`pst_dist.train.predict` computes for a loaded model;
:func:`load_scored` returns the model wrapped to score as the run did.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from .config import ConfigError, check_eval_views, to_dict
from .data.pipeline import Normalize
from .evaluate import load_run_model
from .io import OutputError, atomic_dir, check_out_dir, uncreatable
from .models import export_spec, load_exported, timm_args
from .train import predict

FILES = ("model.safetensors", "config.json")


def _is_export(out: Path) -> bool:
    try:
        spec = json.loads((out / "config.json").read_text(encoding="utf-8"))
        return isinstance(spec, dict) and isinstance(spec.get("pst_dist"), dict)  # a user's null or string is not
    except (OSError, ValueError):
        return False


def export_run(run_dir: Path, out: Path, checkpoint: str | Path | None = None, overwrite: bool = False) -> dict:
    """Write the run's weights and config to the folder ``out`` (an earlier export there is replaced only with
    ``overwrite``; anything else there is refused); returns the config.json written."""
    from safetensors.torch import save_file  # a timm dependency

    out = Path(out)
    if out.suffix == ".safetensors":
        raise OutputError(f"--out {out}: name a folder; model.safetensors and config.json go in it (the layout "
                          f"timm.create_model('local-dir:FOLDER') reads)")
    replace = check_out_dir(out, command="export", marker="config.json", owned=FILES, overwrite=overwrite,
                            is_ours=_is_export)
    if (problem := uncreatable(out.parent)) is not None:  # before the checkpoint is read (it is written beside out)
        raise OutputError(f"--out {out}: cannot be written there: {problem}")
    rm = load_run_model(Path(run_dir), checkpoint)
    chans, size, _ = rm.inputs["shape"]
    kwargs, hook = timm_args(rm.cfg.model, rm.inputs["num_classes"], chans, size)
    own_cfg = rm.model.pretrained_cfg
    spec = {
        "architecture": rm.cfg.model.name,
        "num_classes": rm.inputs["num_classes"],
        "num_features": rm.model.num_features,
        "model_args": {k: v for k, v in kwargs.items() if k != "drop_rate"},  # drop rates only matter in training
        "pretrained_cfg": {**{k: own_cfg[k] for k in ("first_conv", "classifier", "fixed_input_size") if k in own_cfg},
                           "input_size": rm.inputs["shape"], "mean": rm.inputs["mean"], "std": rm.inputs["std"],
                           "num_classes": rm.inputs["num_classes"], "crop_pct": 1.0},
        "pst_dist": {"plain_timm": hook is None, "model": to_dict(rm.cfg.model), "run": str(Path(run_dir).resolve()),
                     "checkpoint": str(rm.checkpoint.resolve()), "epoch": rm.epoch,
                     "eval_views": list(rm.cfg.schedule.eval_views),
                     "dtype": str(rm.dtype).removeprefix("torch.")},  # what the run evaluated in
    }
    with atomic_dir(out, replace=replace, owned=FILES) as tmp:
        save_file({k: v.contiguous() for k, v in rm.model.state_dict().items()}, str(tmp / FILES[0]),
                  metadata={"format": "pt"})
        (tmp / FILES[1]).write_text(json.dumps(spec, indent=2), encoding="utf-8")
    return spec


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class Scored(nn.Module):
    """An exported model as its run scored images: ``forward`` takes float images in [0, 1] (N, C, H, W, the export's
    input size), normalises them in float32 with the export's mean and std, casts them to the model's dtype (a 16-bit
    DeepSpeed run evaluated in bf16 / fp16), and returns the logits, or with test-time ``views`` the mean softmax over
    the image and each view (probabilities; :func:`pst_dist.train.predict`, the run's own evaluation). ``model``: the
    bare model (normalised input, logits)."""

    def __init__(self, model: nn.Module, views: list[str], mean: list[float], std: list[float]):
        super().__init__()
        self.model, self.views = model, list(views)
        # plain tensors, not buffers: a .to(dtype) of the wrapper must not round the statistics
        self.mean, self.std = torch.tensor(mean, dtype=torch.float32), torch.tensor(std, dtype=torch.float32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not x.is_floating_point():
            raise TypeError(f"Scored takes float images in [0, 1], not {x.dtype} (divide uint8 images by 255)")
        normalize = Normalize(self.mean, self.std, x.device, next(self.model.parameters()).dtype)  # as pst-dist eval
        return predict(self.model, x.float(), normalize, self.views)


def load_scored(folder: str | Path) -> Scored:
    """The model ``pst-dist export`` wrote to ``folder`` (:func:`pst_dist.models.load_exported`), in eval mode and in
    the dtype its run evaluated in, wrapped to score [0, 1] images as the run did: its normalisation and its test-time
    views (config.json's ``pst_dist.eval_views``)."""
    spec = export_spec(folder)
    model = load_exported(folder, spec)
    own, inputs = spec["pst_dist"], spec["pretrained_cfg"]
    if "mean" not in inputs or "std" not in inputs:
        raise ConfigError(f"{folder}: config.json's pretrained_cfg has no mean / std: not what `pst-dist export` "
                          f"writes, and the images could not be normalised as the run did")
    views = own.get("eval_views", [])  # exports written before test-time views existed: none
    check_eval_views(f"{folder}/config.json: pst_dist.eval_views", views)
    dtype = own.get("dtype", "float32")  # exports written before it was recorded: scored in float32
    if dtype not in DTYPES:
        raise ConfigError(f"{folder}/config.json: pst_dist.dtype={dtype!r}: expected one of {sorted(DTYPES)}")
    return Scored(model.to(DTYPES[dtype]), views, inputs["mean"], inputs["std"]).eval()
