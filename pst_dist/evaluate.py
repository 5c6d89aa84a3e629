"""``pst-dist eval``: a run's checkpoint evaluated on the run's own data or on any other source; and
:func:`load_run_model`, which ``pst-dist export`` shares: the checkpoint (plain torch, or DeepSpeed's, its ZeRO
partitions gathered on the CPU by DeepSpeed's own ``zero_to_fp32``) loaded into the model the run built.

Nothing is written into the run directory."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from .checkpoint import CheckpointError, load_mapped, load_weights
from .config import RESUME_MAY_CHANGE, Config, ConfigError, DefenseConfig, PoisonConfig, load_config
from .data.pipeline import Data, Normalize, beton_change, beton_digests, build_data, folder_change
from .data.sources import DataError, Split, ValSizeError, list_folder, load_streamed_splits
from .distributed import build_device
from .engine.deepspeed import CHECKPOINT_DIR, LATEST, MODEL_STATES, check_ds_checkpoint, load_ds_file
from .io import load_failure
from .models import build_model
from .rundir import check_own_data, recorded_inputs
from .train import evaluate, model_inputs

EVAL_OVERRIDES = ("data.", "train.device", "train.threads", "schedule.eval_views")
"""What ``pst-dist eval`` may override in the run's recorded config: the data, where it runs, and the test-time
views (the weights are the run's)."""


@dataclass
class RunModel:
    """A run's model, built as the run built it, with a checkpoint's weights (on the CPU, in eval mode)."""

    cfg: Config
    """The run's recorded config."""
    model: nn.Module
    inputs: dict
    """What the model was built for: num_classes, shape [C, H, W], and the run's normalisation mean and std."""
    checkpoint: Path
    epoch: int
    """Epochs trained when the checkpoint was written."""
    dtype: torch.dtype
    """The dtype the run evaluated in: float32, or the bf16 / fp16 weights of DeepSpeed's 16-bit modes."""

    def accuracy(self, part: Split, device: torch.device, views: list[str] | tuple = ()) -> float:
        """Accuracy on ``part`` as the run evaluated: on ``device`` in the run's dtype, normalised with the run's
        statistics, with test-time ``views`` (schedule.eval_views)."""
        model = self.model.to(device=device, dtype=self.dtype)
        normalize = Normalize(torch.tensor(self.inputs["mean"]), torch.tensor(self.inputs["std"]), device, self.dtype)
        return evaluate(model, part.images, part.labels, normalize, device, views=views)


def recorded_config(run_dir: Path, overrides: list[str] | tuple = ()) -> Config:
    f = Path(run_dir) / "config.toml"
    if not f.is_file():
        raise ConfigError(f"--run {run_dir}: no config.toml there; not a pst-dist run directory")
    return load_config(f, list(overrides), recorded=True)


def load_run_model(run_dir: Path, checkpoint: str | Path | None = None, own_data: Data | None = None,
                   cfg: Config | None = None) -> RunModel:
    """The model of the run in ``run_dir`` with the weights of ``checkpoint`` (checkpoint.pt, a ds_checkpoint
    folder or one of its step<N> tags; default: the run's latest). ``own_data``: the run's own data, already built
    (the model's inputs are read from it when meta.json does not record them); ``cfg``: the run's recorded config,
    already read."""
    run_dir = Path(run_dir)
    check_own_data(run_dir, "its weights cannot be evaluated or exported as its config says")
    cfg = cfg or recorded_config(run_dir)
    path = find_checkpoint(run_dir, checkpoint)
    weights, epoch, model_name, dtype = read_checkpoint(path)
    if model_name != cfg.model.name:
        raise CheckpointError(f"{path}: checkpoint is of model {model_name!r}, the run's config says "
                              f"{cfg.model.name!r}")
    inputs = recorded_inputs(run_dir) or model_inputs(own_data or build_data(clean(cfg)))
    model = build_model(cfg.model, inputs["num_classes"], inputs["shape"][0], inputs["shape"][1])
    load_weights(path, model, weights)
    return RunModel(cfg, model.eval(), inputs, path, epoch, dtype)


def find_checkpoint(run_dir: Path, checkpoint: str | Path | None = None) -> Path:
    """``checkpoint`` (a DeepSpeed checkpoint folder resolved to the tag its ``latest`` names), else the run's
    latest checkpoint: its checkpoint.pt, or the tag ds_checkpoint/latest names."""
    if checkpoint:
        p = Path(checkpoint)
        if not p.exists():
            raise CheckpointError(f"--checkpoint {p}: not found")
        inside = (Path(os.path.abspath(p)).is_relative_to(os.path.abspath(run_dir))  # a link in the run included
                  or p.resolve().is_relative_to(Path(run_dir).resolve()))
        if not inside:  # another run's weights would be scored with this run's data, normalisation and views
            raise CheckpointError(f"--checkpoint {p}: not in the run {run_dir}; a checkpoint is scored and exported "
                                  f"with its own run's config (pass that run as --run)")
    else:
        p = next((q for q in (run_dir / "checkpoint.pt", run_dir / CHECKPOINT_DIR) if q.exists()), None)
        if p is None:
            raise CheckpointError(f"{run_dir}: no checkpoint (checkpoint.pt or {CHECKPOINT_DIR}/) in the run")
    if p.is_dir() and (p / LATEST).is_file():
        try:
            tag = (p / LATEST).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{p / LATEST}: cannot be read ({e})") from None
        if tag in ("", ".", "..") or "/" in tag or "\\" in tag:  # a tag folder of p, never a path elsewhere
            raise CheckpointError(f"{p / LATEST}: names {tag!r}, not a checkpoint tag (a folder's name) in {p}")
        p = p / tag
    return p


def read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], int, str | None, torch.dtype]:
    """(full state dict, epoch, model name, dtype the run evaluated in) of a pst-dist checkpoint: a checkpoint.pt
    file or a DeepSpeed tag folder."""
    if path.is_dir():
        return _deepspeed_weights(path)
    try:
        payload = load_mapped(path)  # the optimizer's state left unread
        return payload["model"], int(payload["state"]["epoch"]), payload.get("model_name"), torch.float32
    except Exception as e:  # noqa: BLE001 - any unpickling failure or missing key is a bad file
        raise CheckpointError(f"{path}: not a readable pst-dist checkpoint ({load_failure(e)})") from None


def _deepspeed_weights(tag_dir: Path) -> tuple[dict[str, torch.Tensor], int, str | None, torch.dtype]:
    """ZeRO 1-3: the fp32 master weights, gathered from every rank's partition by DeepSpeed's zero_to_fp32 (with
    the module's buffers); ZeRO 0: the module's own (full) state dict."""
    found = [tag_dir / n for n in MODEL_STATES if (tag_dir / n).is_file()]
    if not found:
        raise CheckpointError(f"{tag_dir}: not a checkpoint (a checkpoint.pt file, or a DeepSpeed tag folder with "
                              f"{' or '.join(MODEL_STATES)})")
    check_ds_checkpoint(tag_dir)  # every file's globals allow-listed before DeepSpeed's own loader unpickles it
    with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed logs to stdout, which carries the command's result
        return _gather(tag_dir, found[0])


def _gather(tag_dir: Path, model_states: Path) -> tuple[dict[str, torch.Tensor], int, str | None, torch.dtype]:
    try:
        states = load_ds_file(model_states)  # ZeRO-0 keeps the optimizer's state here: left unread
        ds, epoch = states["ds_config"], int(states["pst_state"]["epoch"])
    except Exception as e:  # noqa: BLE001 - any unpickling failure or missing key is a bad file
        raise CheckpointError(f"{model_states}: not a readable pst-dist DeepSpeed checkpoint ({type(e).__name__}: "
                              f"{e})") from None
    dtype = torch.bfloat16 if ds.get("bf16", {}).get("enabled") else \
        torch.float16 if ds.get("fp16", {}).get("enabled") else torch.float32
    if ds["zero_optimization"]["stage"] == 0:
        return states["module"], epoch, states.get("model_name"), dtype
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint  # DeepSpeed: only here

    weights = get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
    return weights, epoch, states.get("model_name"), dtype


def clean(cfg: Config) -> Config:
    """``cfg`` without poison and defense: only the data splits and their normalisation are needed."""
    return dataclasses.replace(cfg, poison=PoisonConfig(), defense=DefenseConfig())


def eval_data(cfg: Config, inputs: dict | None, split: str) -> Data:
    """The data to evaluate ``split`` of: ``cfg``'s data without poison or defense. An image folder is only listed,
    and only ``split`` decoded, when the run recorded the normalisation its model takes (``inputs``, which is then
    used): no pass over the training images for their statistics, however large the folder. ``Data.folder``: its
    listing's fingerprint (:meth:`pst_dist.data.sources.FolderListing.fingerprint`)."""
    cfg = clean(cfg)
    if inputs is None or cfg.data.source != "imagefolder":
        return build_data(cfg)
    listing = list_folder(cfg.data)
    splits, files = load_streamed_splits(cfg.data, head=1, listing=listing, decode=(split,))
    return Data(splits, splits.train.images, torch.tensor(inputs["mean"]), torch.tensor(inputs["std"]), stream=files,
                folder=listing.fingerprint())


def folder_as_trained(was: dict | None, now: dict | None) -> bool | None:
    """Does the run's image folder (``now``: its listing's fingerprint) list as it did when the run started (``was``:
    meta.json's ``inputs.folder``)? None when there is nothing to compare (another source, or a run from before the
    listing was recorded). Evaluation goes on either way, with a note on stderr when it does not: the folder may have
    been re-copied on purpose, but a figure from changed data is then not the run's own."""
    if was is None or now is None:
        return None
    change = folder_change(was, now)
    if change is None:
        return True
    how = ("the same files with other modification times" if change == "times"
           else f"files added, removed, renamed or resized: {was.get('files')} files then, {now['files']} now")
    print(f"[eval] note: the image folder is not as the run trained on it ({how}); the accuracy is of the folder as "
          f"it is now", file=sys.stderr)
    return False


def beton_as_trained(was: dict | None, data: Data) -> bool | None:
    """Are the .beton files the run's data.root holds those it trained on (``was``: meta.json's ``inputs.beton``)?
    None when there is nothing to compare (another source, or a run from before the digests were recorded).
    Evaluation goes on either way, with a note on stderr when they are not, as for an image folder."""
    now = beton_digests(data)
    if not was or now is None:
        return None
    changed = beton_change(was, now)
    if changed is not None:
        print(f"[eval] note: the .beton data is not what the run trained on ({changed}: other SHA-256 than recorded, "
              f"written again since); the accuracy is of the files as they are now", file=sys.stderr)
    return changed is None


def evaluate_run(run_dir: Path, checkpoint: str | Path | None = None, overrides: list[str] | tuple = (),
                 split: str = "test") -> dict:
    """Accuracy of the run's checkpoint on ``split`` (test | val) of the run's recorded data, or of the data
    ``overrides`` (``--data.key=value``, :data:`EVAL_OVERRIDES`) describe; normalised as the run normalised its
    inputs, in the dtype it evaluated in."""
    run_dir = Path(run_dir)
    bad = [o for o in overrides if not o.removeprefix("--").startswith(EVAL_OVERRIDES)]
    if bad:
        raise ConfigError(f"pst-dist eval: {bad[0]!r}: only data.* (what to evaluate on), train.device, "
                          f"train.threads and schedule.eval_views may be overridden; the model and its weights are "
                          f"the run's")
    recorded = recorded_config(run_dir)
    cfg = recorded_config(run_dir, overrides) if overrides else recorded
    inputs = recorded_inputs(run_dir)
    path = find_checkpoint(run_dir, checkpoint)  # one missing or outside the run: refused before the data is read
    try:
        data = eval_data(cfg, inputs, split)
    except ValSizeError as e:  # the run's validation carve, applied to other data, may not fit it
        if any(o.removeprefix("--").startswith("data.val_size=") for o in overrides):
            raise
        raise DataError(f"{e}: data.val_size is the run's recorded value; for this data give --data.val_size=N "
                        f"(the images carved for validation before the {split} split is read)") from None
    # the run's own data, whatever the settings that only say how it is read (those a resume may change too)
    how = [k.removeprefix("data.") for k in RESUME_MAY_CHANGE if k.startswith("data.")] + ["loader"]
    own = dataclasses.replace(cfg.data, **{k: getattr(recorded.data, k) for k in how}) == recorded.data
    rm = load_run_model(run_dir, path, own_data=data if own else None, cfg=recorded)
    as_trained = folder_as_trained((inputs or {}).get("folder"), data.folder) if own else None
    beton_same = beton_as_trained((inputs or {}).get("beton"), data) if own else None
    part = getattr(data.splits, split)
    chans, num_classes = rm.inputs["shape"][0], rm.inputs["num_classes"]
    if data.splits.shape[0] != chans:
        raise DataError(f"data.source={cfg.data.source!r}: {data.splits.shape[0]}-channel images; the run's model "
                        f"takes {chans} channels")
    if len(part) and int(part.labels.max()) >= num_classes:
        raise DataError(f"data.source={cfg.data.source!r}: label {int(part.labels.max())} in the {split} split; the "
                        f"run's model has {num_classes} classes")
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    try:
        acc = rm.accuracy(part, build_device(cfg), views=cfg.schedule.eval_views)
    except RuntimeError as e:
        if list(data.splits.shape) == list(rm.inputs["shape"]):
            raise
        raise DataError(f"data.source={cfg.data.source!r}: the run's model ({cfg.model.name}, built for "
                        f"{rm.inputs['shape']}) cannot take {list(data.splits.shape)} images ({e})") from None
    return {"run": str(run_dir), "checkpoint": str(rm.checkpoint), "epoch": rm.epoch, "split": split,
            "data.source": cfg.data.source, "data.root": cfg.data.root, "images": len(part),
            "eval_views": list(cfg.schedule.eval_views), "accuracy": acc,
            **({} if as_trained is None else {"folder_as_trained": as_trained}),
            **({} if beton_same is None else {"beton_as_trained": beton_same}),
            **({"overrides": [o if o.startswith("--") else f"--{o}" for o in overrides]} if overrides else {})}
