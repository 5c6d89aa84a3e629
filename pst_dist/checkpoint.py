"""Checkpoints: model, optimizer, schedule state (step, trigger history), RNG; written atomically, read with
``weights_only=True`` and checked against the model they are loaded into."""

from __future__ import annotations

import random
from pathlib import Path

import torch

from .io import save_stream_atomic


class CheckpointError(ValueError):
    pass


def rng_state() -> dict:
    """This process's torch and Python RNG states as tensors and ints (loadable with ``weights_only=True``)."""
    py = random.getstate()
    return {"rng_torch": torch.get_rng_state(), "rng_python": list(py[1]), "rng_python_pos": py[2]}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["rng_torch"])
    random.setstate((3, tuple(state["rng_python"]), state["rng_python_pos"]))


def save_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict,
                    model_name: str) -> None:
    payload = {
        "model_name": model_name,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "state": state,
        **rng_state(),
    }
    if torch.cuda.is_available():
        payload["rng_cuda"] = torch.cuda.get_rng_state_all()
    save_stream_atomic(path, lambda f: torch.save(payload, f))  # a full disk: the last checkpoint stays, no temp file


def load_weights(path: Path, model: torch.nn.Module, theirs: dict[str, torch.Tensor]) -> None:
    """``model.load_state_dict(theirs)``, or a CheckpointError naming ``path`` and a tensor that does not fit."""
    own = model.state_dict()
    bad = [k for k in own if k not in theirs or theirs[k].shape != own[k].shape]
    extra = [k for k in theirs if k not in own]
    if bad or extra:
        k = (bad or extra)[0]
        found = tuple(theirs[k].shape) if k in theirs else "missing"
        want = tuple(own[k].shape) if k in own else "absent"
        raise CheckpointError(f"{path}: checkpoint does not fit this model ({len(bad) + len(extra)} mismatched "
                              f"tensors; e.g. {k}: checkpoint {found}, model {want})")
    model.load_state_dict(theirs)


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, model_name: str) -> dict:
    """Restore model, optimizer and RNG; return the saved trainer state. Clear errors for foreign checkpoints."""
    if not path.is_file():
        raise CheckpointError(f"no checkpoint to resume from at {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is a bad file
        raise CheckpointError(f"{path}: not a readable pst-dist checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(payload, dict) or "model" not in payload:
        raise CheckpointError(f"{path}: not a pst-dist checkpoint")
    if payload.get("model_name") != model_name:
        raise CheckpointError(f"{path}: checkpoint is of model {payload.get('model_name')!r}, config says "
                              f"{model_name!r}")
    load_weights(path, model, payload["model"])
    optimizer.load_state_dict(payload["optimizer"])
    set_rng_state(payload)
    if "rng_cuda" in payload and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(payload["rng_cuda"])
    return payload["state"]
