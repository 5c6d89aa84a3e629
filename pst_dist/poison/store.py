"""Lossless storage of a poisoned training set (``pst-dist poison``) and reading it back.

A stored poison is a directory: ``train_images.npy`` (uint8, N x C x H x W, every image of the source's training
split in the source's own order) and ``poison.json`` (attack, its parameters and seed, the clean data set's
fingerprint, the measured L-inf / L2 / L0 norms, generation time, the file's SHA-256). It is written under a
temporary name and renamed into place, so an interrupted run leaves nothing that looks complete. Training reads it
with ``poison.kind = "file"`` and ``poison.path = <directory>``.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from ..config import Config, ConfigError
from .imported import PoisonFileError, norms

FORMAT = "pst-dist-poison/1"


def write_poisoned(cfg: Config, out: Path, log=print) -> dict:
    """Poison every training image of ``cfg.data``'s source with ``cfg.poison`` and store it at ``out``."""
    from ..data.beton import fingerprint
    from ..data.sources import Split, load_splits
    from . import poison_train
    from .model_based import LAST_RUN

    if cfg.poison.kind in ("none", "file"):
        raise ConfigError(f"pst-dist poison: poison.kind={cfg.poison.kind!r} is not an attack to generate")
    data = copy.deepcopy(cfg.data)
    data.val_from, data.train_size = "test", 0  # every image of the source's training split
    splits = load_splits(data)
    tr = splits.train
    order = torch.argsort(tr.index)  # back to the source's own order
    if len(order) != splits.source_train_size:
        raise ConfigError(f"pst-dist poison: expected all {splits.source_train_size} training images, got {len(order)}")
    clean = Split(tr.images[order], tr.labels[order], tr.index[order])
    t0 = time.time()
    LAST_RUN.clear()
    poisoned = poison_train(clean.images, clean.labels, clean.index, splits.source_train_size, cfg.poison,
                            splits.num_classes, full=cfg)
    seconds = time.time() - t0
    log(f"[poison] {cfg.poison.kind} on {len(clean)} images of {cfg.data.source}: {seconds:.1f} s")
    meta = {"format": FORMAT, "attack": cfg.poison.kind, "parameters": asdict(cfg.poison),
            "seed": cfg.poison.seed, "source": cfg.data.source, "shape": list(poisoned.shape),
            "fingerprint": {"clean_train_sha256": fingerprint(clean)}, "norms": norms(clean.images, poisoned),
            "seconds": round(seconds, 2), "model_based": dict(LAST_RUN)}  # cleared above: filled only by em/rem/tap
    save_dir(out, {"train_images.npy": lambda f: np.save(f, poisoned.numpy())}, meta, "poison.json",
             hash_of="train_images.npy")
    return meta


def save_dir(out: Path, files: dict, meta: dict, meta_name: str, hash_of: str | None = None) -> None:
    """Write ``files`` (name -> writer taking a path) and ``meta`` as JSON into a fresh directory, renamed to ``out``
    only once complete: an interrupted write leaves no directory that looks finished; a previous ``out`` is
    replaced only then. ``hash_of``: record that file's SHA-256 in the metadata."""
    from ..data.beton import sha256

    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        for name, write in files.items():
            write(tmp / name)
        if hash_of is not None:
            meta[f"{Path(hash_of).stem}_sha256"] = sha256(tmp / hash_of)
        (tmp / meta_name).write_text(json.dumps(meta, indent=2))
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def read_stored(path: Path, images: torch.Tensor, index: torch.Tensor, source_size: int) -> torch.Tensor:
    """The stored poisoned images for ``images`` (rows ``index`` of the source's training split), checked against
    the metadata (format, shape, file hash) and against these clean images: the perturbation measured here must
    stay within the norms recorded when the poison was made, or it was made for another data set."""
    meta_file = path / "poison.json"
    if not meta_file.is_file():
        raise PoisonFileError(f"{path}: not a stored poison (no poison.json; write one with `pst-dist poison`)")
    meta = json.loads(meta_file.read_text())
    if meta.get("format") != FORMAT:
        raise PoisonFileError(f"{meta_file}: format {meta.get('format')!r}, expected {FORMAT!r}")
    expect = [source_size, *images.shape[1:]]
    if meta["shape"] != expect:
        raise PoisonFileError(f"{path}: shape mismatch: expected {expect} (the source's training split), found "
                              f"{meta['shape']}")
    from ..data.beton import sha256

    data_file = path / "train_images.npy"
    if not data_file.is_file() or sha256(data_file) != meta["train_images_sha256"]:
        raise PoisonFileError(f"{data_file}: missing or changed since it was written (SHA-256 differs from "
                              f"poison.json)")
    stored = torch.from_numpy(np.load(data_file, allow_pickle=False))[index]
    found, recorded = norms(images, stored), meta["norms"]
    for key in ("linf", "l2_max"):
        if found[key] > recorded[key] + 1e-6:
            raise PoisonFileError(f"{path}: does not fit this data set: {key} of the perturbation is {found[key]:.4f} "
                                  f"here, {recorded[key]:.4f} when it was made (another data set or order?)")
    return stored.contiguous()
