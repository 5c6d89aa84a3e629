"""Poisons made elsewhere as a folder of image files: one file per training image, named by its row in the source's
training split (``00042.png``, any zero padding), either flat or in one subfolder per class (``3/00042.png``, the
folder name being the label, checked); a folder holding only ``data/`` is read there (APBench's
``<attack>_poisons/<dataset>/data/42.png``). PNG / BMP / TIFF are lossless; JPEG files are read but warned about (JPEG
is itself a defense against these poisons, so results on them measure poison + JPEG). Files are decoded by
:func:`pst_dist.data.sources.decode_image`, as image folders are: 8-bit modes only (alpha discarded), 16-bit / float
images and decompression bombs refused by name."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from ..data.sources import decode_image
from .budget import PoisonFileError

IMAGE_SUFFIXES = {".png", ".bmp", ".tif", ".tiff", ".jpg", ".jpeg", ".webp"}


def index_files(path: Path, source_size: int) -> dict[int, tuple[Path, int | None]]:
    """Row -> (file, label given by its class folder or None); every name and row checked."""
    found: dict[int, tuple[Path, int | None]] = {}
    for f in sorted(path.rglob("*")):
        if not f.is_file() or f.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        rel = f.relative_to(path)
        if len(rel.parts) > 2:
            raise PoisonFileError(f"{f}: expected <row>.png or <class>/<row>.png under {path}, found depth "
                                  f"{len(rel.parts)}")
        label = None
        if len(rel.parts) == 2:
            if not (rel.parts[0].isascii() and rel.parts[0].isdigit()):
                raise PoisonFileError(f"{f}: class folder {rel.parts[0]!r}: expected the numeric label")
            label = int(rel.parts[0])
        if not (f.stem.isascii() and f.stem.isdigit()):
            raise PoisonFileError(f"{f}: file name {f.stem!r}: expected the image's row in the training split "
                                  f"(digits, e.g. 00042{f.suffix})")
        row = int(f.stem)
        if row >= source_size:
            raise PoisonFileError(f"{f}: row {row} out of range: the training split has {source_size} images "
                                  f"(rows 0..{source_size - 1})")
        if row in found:
            raise PoisonFileError(f"row {row} appears twice: {found[row][0]} and {f}")
        found[row] = (f, label)
    if not found:
        raise PoisonFileError(f"{path}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) found")
    return found


def read_folder(path: Path, images: torch.Tensor, labels: torch.Tensor, index: torch.Tensor, source_size: int
                ) -> torch.Tensor:
    """uint8 poisoned images for ``images`` (rows ``index`` of the source's training split), read from ``path``."""
    if (path / "data").is_dir() and not any(p.name.isdigit() or p.suffix.lower() in IMAGE_SUFFIXES
                                            for p in path.iterdir()):
        path = path / "data"  # APBench's export: <attack>_poisons/<dataset>/data/<row>.png
    files = index_files(path, source_size)
    if len(files) != source_size:
        missing = [r for r in range(source_size) if r not in files][:5]
        raise PoisonFileError(f"{path}: expected {source_size} images (one per training image), found {len(files)}; "
                              f"missing rows e.g. {missing}")
    c, h, w = images.shape[1:]
    out = torch.empty_like(images)
    lossy = 0
    for i, row in enumerate(index.tolist()):
        f, label = files[row]
        if label is not None and label != int(labels[i]):
            raise PoisonFileError(f"{f}: in class folder {label}, but training row {row} has label {int(labels[i])}")
        lossy += f.suffix.lower() in (".jpg", ".jpeg", ".webp")
        im = decode_image(f, PoisonFileError, size=(w, h))  # "L" or "RGB"; another size is refused before decoding
        mode, arr = im.mode, np.asarray(im)
        if arr.ndim == 2:
            arr = arr[:, :, None]
        if arr.shape[2] != c:
            if c == 1 and arr.shape[2] == 3 and (arr == arr[:, :, :1]).all():
                arr = arr[:, :, :1]  # gray stored as RGB with equal channels
            else:
                raise PoisonFileError(f"{f}: {arr.shape[2]} channel(s) ({mode}): expected {c}")
        out[i] = torch.from_numpy(np.array(arr.transpose(2, 0, 1)))
    if lossy:
        print(f"[poison] warning: {lossy} of {len(index)} imported images are JPEG/WebP: lossy compression is itself a "
              f"defense (ISS), so results measure poison + compression", file=sys.stderr)
    return out
