"""Poisons made elsewhere, validated against the data set before they touch anything. Rows follow the source's own
training order (``Split.index``). Accepted (``poison.path``):

- a .pt (``weights_only=True``) or .npy tensor: N x C x H x W or N x H x W x C, N = the source's training images,
  of float offsets in [0, 1] pixel units or uint8 poisoned images; or K x C x H x W float offsets, K = the classes,
  the offset of class y added to every image of class y. Unlearnable-Examples' ``perturbation.pt`` is the
  sample-wise or class-wise case; ``poison.offsets`` says how offsets are added (:func:`add_offsets`);
- a directory written by ``pst-dist poison`` (:mod:`.store`);
- APBench's numpy export (its TAP ``--save numpy``): ``poisoned_training_data.npy`` (N x H x W x C pixel values,
  float64) with ``poisoned_training_labels.npy`` beside it;
- a folder of image files (:mod:`.folder`), APBench's ``<attack>_poisons/<dataset>/`` (``data/<row>.png``) included.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from ..checkpoint import load_mapped
from ..config import PoisonConfig
from ..io import load_failure
from .budget import PoisonFileError, chunks_of, linf_levels, linf_of, row_chunks
from .folder import read_folder
from .store import ARRAY, read_stored

APBENCH_DATA, APBENCH_LABELS = "poisoned_training_data.npy", "poisoned_training_labels.npy"
READABLE_DTYPES = (torch.uint8, torch.float16, torch.bfloat16, torch.float32, torch.float64)
"""What an imported tensor may hold: uint8 poisoned images, or float offsets."""


def read_tensor(path: Path) -> torch.Tensor:
    if not path.is_file():
        raise PoisonFileError(f"poison file not found: {path}")
    try:
        if path.suffix == ".npy":  # memory-mapped (copy-on-write: torch takes only writable arrays); rows read as used
            return torch.from_numpy(np.load(path, allow_pickle=False, mmap_mode="c"))
        if path.suffix == ".pt":
            obj = load_mapped(path)
        else:
            raise PoisonFileError(f"{path}: expected a .pt or .npy file, found suffix {path.suffix!r}")
    except PoisonFileError:
        raise
    except Exception as e:  # noqa: BLE001 - any decoding failure is a bad file
        raise PoisonFileError(f"{path}: cannot read a tensor from it ({load_failure(e)})") from e
    if not isinstance(obj, torch.Tensor):
        raise PoisonFileError(f"{path}: expected a tensor, found {type(obj).__name__}")
    if obj.layout != torch.strided or obj.dtype not in READABLE_DTYPES or obj.device.type != "cpu":
        kind = (f"{obj.device.type}-device tensor (no values)" if obj.device.type != "cpu" else str(obj.dtype)
                if obj.layout == torch.strided else f"{obj.layout} tensor of {obj.dtype}")
        raise PoisonFileError(f"{path}: a {kind}: expected a dense tensor of uint8 images or float offsets "
                              f"({', '.join(str(d) for d in READABLE_DTYPES[1:])})")
    return obj


def to_nchw(t: torch.Tensor, n: int, k: int | None, chw: tuple[int, int, int], path: Path) -> torch.Tensor:
    """``t`` as rows x C x H x W, rows being ``n`` (one per training image) or ``k`` (one per class, when given)."""
    c, h, w = chw
    if t.ndim == 5:
        raise PoisonFileError(f"{path}: 5-D shape {tuple(t.shape)}: several perturbation sets (Unlearnable-Examples "
                              f"draws one per image at random); save the one set to use, (N or K) x C x H x W")
    if t.ndim == 4 and tuple(t.shape[1:]) in ((c, h, w), (h, w, c)):
        if t.shape[0] in (n, k):
            return t if tuple(t.shape[1:]) == (c, h, w) else t.permute(0, 3, 1, 2)
        classes = f" or K = {k} (class-wise offsets, one per class)" if k else ""
        raise PoisonFileError(f"{path}: {t.shape[0]} rows: expected N = {n} (one per image of the source's training "
                              f"split){classes}")
    raise PoisonFileError(f"{path}: shape mismatch: expected (rows, C, H, W) = (rows, {c}, {h}, {w}) or (rows, H, W, "
                          f"C) = (rows, {h}, {w}, {c}), rows being N = {n} (the source's training images)"
                          + (f" or K = {k} (the classes)" if k else "") + f"; found {tuple(t.shape)}")


def add_offsets(images: torch.Tensor, offsets: torch.Tensor, rows: torch.Tensor, how: str) -> torch.Tensor:
    """uint8 ``images`` plus the float ``offsets[rows]`` ([0, 1] pixel units), a chunk at a time.

    ``signed``: round(x + 255 d), clipped to 0..255. ``ue``: as Unlearnable-Examples' dataset.py, in its float32
    arithmetic: 255 d clamped to [0, 255] first (negative offsets dropped; their issue #13 calls it a slip), added,
    clipped, and truncated by the uint8 cast (x + 3.9 gives x + 3), so its training images come out exactly."""
    out = torch.empty_like(images)
    for part in chunks_of(images):
        x, d = images[part], offsets[rows[part]]
        if how == "ue":
            y = (x.float() + d.float().mul(255).clamp(0, 255)).clamp(0, 255)
        else:
            y = (x.double() + d.double() * 255).round().clamp(0, 255)
        out[part] = y.to(torch.uint8)
    return out


def read_tensor_poison(path: Path, images: torch.Tensor, labels: torch.Tensor | None, index: torch.Tensor,
                       source_size: int, num_classes: int | None, how: str) -> torch.Tensor:
    """uint8 poisoned images from a .pt / .npy tensor, sample-wise (one row per source image) or class-wise."""
    t = read_tensor(path)
    t = to_nchw(t, source_size, num_classes if labels is not None else None, tuple(images.shape[1:]), path)
    classwise = len(t) != source_size
    if t.dtype == torch.uint8:
        if classwise:
            raise PoisonFileError(f"{path}: uint8 with {len(t)} rows: poisoned images need one row per training "
                                  f"image (N = {source_size}); class-wise files hold float offsets")
        return t[index].contiguous()
    if not t.is_floating_point():
        raise PoisonFileError(f"{path}: dtype {t.dtype}: expected uint8 poisoned images or float offsets")
    amax = 0.0
    for part in chunks_of(t):  # one pass over the (memory-mapped) file, never a copy of all of it
        if not bool(torch.isfinite(t[part]).all()):
            raise PoisonFileError(f"{path}: float offsets contain NaN or inf")
        amax = max(amax, float(t[part].abs().max()))
    if amax > 1:
        raise PoisonFileError(f"{path}: float offsets must lie in [-1, 1] (pixel units of [0, 1]); found |max| "
                              f"{amax:.4g} (offsets in 0-255 units? divide by 255)")
    return add_offsets(images, t, labels if classwise else index, how)


def read_apbench_numpy(directory: Path, images: torch.Tensor, labels: torch.Tensor, index: torch.Tensor,
                       source_size: int) -> torch.Tensor:
    """uint8 poisoned images from APBench's numpy export, its labels checked against the training labels."""
    data_file, label_file = directory / APBENCH_DATA, directory / APBENCH_LABELS
    arrays = []
    for f in (data_file, label_file):
        if not f.is_file():
            raise PoisonFileError(f"{f}: missing (APBench's numpy export writes {APBENCH_DATA} and {APBENCH_LABELS})")
        try:
            arrays.append(np.load(f, allow_pickle=False, mmap_mode="r"))
        except Exception as e:  # noqa: BLE001 - any decoding failure is a bad file
            raise PoisonFileError(f"{f}: not a readable .npy array ({type(e).__name__}: {e})") from None
    data, file_labels = arrays
    c, h, w = images.shape[1:]
    if data.shape != (source_size, h, w, c) or data.dtype.kind not in "iuf":  # not bool, complex or objects
        raise PoisonFileError(f"{data_file}: {data.dtype} {list(data.shape)}: expected integer or float pixel values "
                              f"N x H x W x C = {[source_size, h, w, c]} (N = the source's training images)")
    if file_labels.shape != (source_size,) or file_labels.dtype.kind not in "iuf":
        raise PoisonFileError(f"{label_file}: {file_labels.dtype} {list(file_labels.shape)}, expected numeric class "
                              f"indices of shape [{source_size}]")
    rows = index.numpy()
    bad = np.flatnonzero(np.asarray(file_labels[rows], dtype=np.float64) != labels.numpy())
    if len(bad):
        i = int(bad[0])
        raise PoisonFileError(f"{label_file}: row {int(rows[i])} has label {file_labels[rows[i]]:g}, but the training "
                              f"split's row {int(rows[i])} has label {int(labels[i])} ({len(bad)} rows differ: "
                              f"another data set or order?)")
    out = torch.empty_like(images)
    for part in row_chunks(len(rows), math.prod(data.shape[1:])):  # float64 pixels: 1.2 GB for CIFAR-10 at once
        x = np.asarray(data[rows[part]], dtype=np.float64)
        if not (np.isfinite(x).all() and (x == np.round(x)).all() and x.min() >= 0 and x.max() <= 255):
            raise PoisonFileError(f"{data_file}: expected whole pixel values in 0..255, found values in "
                                  f"[{np.nanmin(x):.4g}, {np.nanmax(x):.4g}] or fractional ones")
        out[part] = torch.from_numpy(x.astype(np.uint8).transpose(0, 3, 1, 2))
    return out


def import_poison(images: torch.Tensor, index: torch.Tensor, source_size: int, cfg: PoisonConfig,
                  labels: torch.Tensor | None = None, *, num_classes: int | None = None,
                  verify: bool = True) -> torch.Tensor:
    """Poisoned uint8 images for ``images`` (rows ``index`` of the source's training split of ``source_size``;
    ``labels`` theirs, needed by folders and class-wise offsets, ``num_classes`` by class-wise offsets). ``verify``
    (data.verify): check a `pst-dist poison` store's SHA-256 (about 1 s per GB)."""
    path = Path(cfg.path)
    if path.is_dir() and (path / "poison.json").is_file():  # written by `pst-dist poison`: checked against its
        # metadata, its attack's budget and poison.eps
        return read_stored(path, images, index, source_size, eps=cfg.eps, verify=verify)
    if path.is_dir() and (path / ARRAY).is_file():  # a store's array without the metadata it is checked against
        raise PoisonFileError(f"{path}: holds {ARRAY} but no poison.json: a `pst-dist poison` store missing its "
                              f"metadata (attack, budget, hashes) cannot be checked; restore poison.json, or make "
                              f"the store again")
    apbench_numpy = (path / APBENCH_DATA).is_file() or path.name == APBENCH_DATA
    if (path.is_dir() or apbench_numpy) and labels is None:
        raise ValueError(f"importing {path} needs the training labels")
    if apbench_numpy:
        out = read_apbench_numpy(path if path.is_dir() else path.parent, images, labels, index, source_size)
    elif path.is_dir():  # a folder of poisoned image files
        out = read_folder(path, images, labels, index, source_size)
    else:
        out = read_tensor_poison(path, images, labels, index, source_size, num_classes, cfg.offsets)
    linf = linf_of(images, out)
    budget = linf_levels(cfg.eps)
    if linf > budget:
        raise PoisonFileError(f"{path}: L-inf {linf}/255 exceeds poison.eps={cfg.eps:g} ({budget}/255 in whole pixel "
                              f"levels; raise poison.eps to accept it)")
    return out
