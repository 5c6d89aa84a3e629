"""Checkpoints: model, optimizer, schedule state (step, trigger history), RNG; written atomically, read with
``weights_only=True`` and checked against the model they are loaded into."""

from __future__ import annotations

import random
from pathlib import Path

import torch

from .io import CheckpointError, load_failure, save_stream_atomic


def rng_state() -> dict:
    """This process's torch and Python RNG states as tensors and ints (loadable with ``weights_only=True``), and on a
    GPU machine the CUDA generators' (``rng_cuda``: dropout, random views and crops drawn on the device)."""
    py = random.getstate()
    state = {"rng_torch": torch.get_rng_state(), "rng_python": list(py[1]), "rng_python_pos": py[2]}
    if torch.cuda.is_available():
        state["rng_cuda"] = torch.cuda.get_rng_state_all()
    return state


RNG_KEYS = ("rng_torch", "rng_python", "rng_python_pos")
"""What :func:`rng_state` saves on every machine."""
PAYLOAD_KEYS = ("model_name", "model", "optimizer", "state")
"""What :func:`save_checkpoint` writes besides :func:`rng_state` (checked by :func:`set_rng_state`)."""


def load_mapped(path: Path | str):
    """``torch.load``, weights only, memory-mapped where the file's format allows it (torch.save's zip format, the
    default since torch 1.6: what is not read stays on disk); a file in another format is read whole, so what is
    wrong with it is said by the weights-only load itself, not by mmap."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as e:
        if "mmap" not in str(e):
            raise
        return torch.load(path, map_location="cpu", weights_only=True)


def set_rng_state(state: dict, path: Path | str = "checkpoint") -> None:
    """Put back what :func:`rng_state` saved, or a CheckpointError naming ``path`` (its file) and what is wrong."""
    missing = [k for k in RNG_KEYS if k not in state] if isinstance(state, dict) else list(RNG_KEYS)
    if missing:
        raise CheckpointError(f"{path}: no random-number state to resume with (missing {', '.join(missing)})")
    try:
        torch.set_rng_state(state["rng_torch"])
        random.setstate((3, tuple(state["rng_python"]), state["rng_python_pos"]))
        if "rng_cuda" in state and torch.cuda.is_available():  # the DeepSpeed engine's rng_rank<N>.pt lacked it;
            for i, s in enumerate(state["rng_cuda"][: torch.cuda.device_count()]):  # a machine with fewer GPUs:
                torch.cuda.set_rng_state(s, i)  # those it has
    except (TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path}: its random-number state cannot be restored ({type(e).__name__}: {e})") from None


def save_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict,
                    model_name: str) -> None:
    payload = {
        "model_name": model_name,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "state": state,
        **rng_state(),
    }
    save_stream_atomic(path, lambda f: torch.save(payload, f))  # a full disk: the last checkpoint stays, no temp file


def load_weights(path: Path, model: torch.nn.Module, theirs: dict[str, torch.Tensor]) -> None:
    """``model.load_state_dict(theirs)``, or a CheckpointError naming ``path`` and a tensor that does not fit."""
    if not isinstance(theirs, dict) or not all(isinstance(v, torch.Tensor) for v in theirs.values()):
        raise CheckpointError(f"{path}: its model weights are a {type(theirs).__name__}, not a state dict of tensors "
                              f"(not a pst-dist checkpoint?)")
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
        raise CheckpointError(f"{path}: not a readable pst-dist checkpoint ({load_failure(e)})") from None
    if not isinstance(payload, dict) or "model" not in payload:
        raise CheckpointError(f"{path}: not a pst-dist checkpoint")
    if payload.get("model_name") != model_name:
        raise CheckpointError(f"{path}: checkpoint is of model {payload.get('model_name')!r}, config says "
                              f"{model_name!r}")
    if missing := [k for k in PAYLOAD_KEYS if k not in payload]:
        raise CheckpointError(f"{path}: not a complete pst-dist checkpoint (missing {', '.join(missing)})")
    if not isinstance(payload["model"], dict) or not isinstance(payload["state"], dict):
        raise CheckpointError(f"{path}: not a pst-dist checkpoint (its model or trainer state is not a mapping)")
    load_weights(path, model, payload["model"])
    try:
        optimizer.load_state_dict(payload["optimizer"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path}: its optimizer state does not fit this run's optimizer "
                              f"({type(e).__name__}: {e})") from None
    set_rng_state(payload, path)
    return payload["state"]
