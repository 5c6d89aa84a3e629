"""Poisons made elsewhere: a perturbation or poisoned-image tensor in a .pt or .npy file, validated against the
data set before it touches anything. Rows follow the source's own training order (``Split.index``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..config import PoisonConfig
from .budget import PoisonFileError
from .folder import read_folder
from .store import read_stored


def read_tensor(path: Path) -> torch.Tensor:
    if not path.is_file():
        raise PoisonFileError(f"poison file not found: {path}")
    try:
        if path.suffix == ".npy":
            return torch.from_numpy(np.load(path, allow_pickle=False))
        if path.suffix == ".pt":
            obj = torch.load(path, map_location="cpu", weights_only=True)
        else:
            raise PoisonFileError(f"{path}: expected a .pt or .npy file, found suffix {path.suffix!r}")
    except PoisonFileError:
        raise
    except Exception as e:  # noqa: BLE001 - any decoding failure is a bad file
        raise PoisonFileError(f"{path}: cannot read a tensor from it ({type(e).__name__}: {e})") from e
    if not isinstance(obj, torch.Tensor):
        raise PoisonFileError(f"{path}: expected a tensor, found {type(obj).__name__}")
    return obj


def to_nchw(t: torch.Tensor, n: int, chw: tuple[int, int, int], path: Path) -> torch.Tensor:
    c, h, w = chw
    if t.ndim == 4 and tuple(t.shape) == (n, c, h, w):
        return t
    if t.ndim == 4 and tuple(t.shape) == (n, h, w, c):
        return t.permute(0, 3, 1, 2)
    raise PoisonFileError(f"{path}: shape mismatch: expected (N, C, H, W) = {(n, c, h, w)} or (N, H, W, C) = "
                          f"{(n, h, w, c)} (N = the source's training images), found {tuple(t.shape)}")


def import_poison(images: torch.Tensor, index: torch.Tensor, source_size: int, cfg: PoisonConfig,
                  labels: torch.Tensor | None = None, *, verify: bool = True) -> torch.Tensor:
    """Poisoned uint8 images for ``images`` (rows ``index`` of the source's training split of ``source_size``).
    ``verify`` (data.verify): check a `pst-dist poison` store's SHA-256 (about 1 s per GB)."""
    path = Path(cfg.path)
    if path.is_dir() and (path / "poison.json").is_file():  # written by `pst-dist poison`: checked against its
        # metadata, its attack's budget and poison.eps
        return read_stored(path, images, index, source_size, eps=cfg.eps, verify=verify)
    if path.is_dir():  # a folder of poisoned image files
        if labels is None:
            raise ValueError("importing a folder of images needs the training labels")
        t = read_folder(path, images, labels, index, source_size)
    else:
        t = read_tensor(path)
        t = to_nchw(t, source_size, tuple(images.shape[1:]), path)[index]
    if t.dtype == torch.uint8:
        out = t.contiguous()
    elif t.is_floating_point():
        if not bool(torch.isfinite(t).all()):
            raise PoisonFileError(f"{path}: float offsets contain NaN or inf")
        amax = float(t.abs().max()) if t.numel() else 0.0
        if amax > 1:
            raise PoisonFileError(f"{path}: float offsets must lie in [-1, 1] (pixel units of [0, 1]); found |max| "
                                  f"{amax:.4g} (offsets in 0-255 units? divide by 255)")
        out = (images.double() + t.double() * 255).round().clamp(0, 255).to(torch.uint8)
    else:
        raise PoisonFileError(f"{path}: dtype {t.dtype}: expected uint8 poisoned images or float offsets")
    linf = int((out.to(torch.int16) - images.to(torch.int16)).abs().max()) if len(out) else 0
    budget = int(round(cfg.eps * 255))
    if linf > budget:
        raise PoisonFileError(f"{path}: L-inf {linf}/255 exceeds poison.eps = {budget}/255 (raise poison.eps to "
                              f"accept it)")
    return out
