"""Lossless storage of a poisoned training set (``pst-dist poison``) and reading it back.

A stored poison is a directory: ``train_images.npy`` (uint8, N x C x H x W, every image of the source's training
split in the source's own order) and ``poison.json`` (attack, its parameters and seed, the clean data set's
fingerprint, the measured L-inf / L2 / L0 norms, generation time, the file's SHA-256). It is built in a hidden
sibling directory and renamed into place (:func:`pst_dist.io.atomic_dir`), so an interrupted run leaves nothing that
looks complete; an existing ``--out`` is used only when empty, or replaced only when it holds an earlier store and
``--overwrite`` was given. Training reads it with ``poison.kind = "file"`` and ``poison.path = <directory>``.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from ..config import POISONS, Config, ConfigError, PoisonConfig
from ..io import OutputError, atomic_dir, check_out_dir, read_json, sha256
from .imported import PoisonFileError, norms

FORMAT = "pst-dist-poison/1"
META = "poison.json"
ARRAY = "train_images.npy"
OWNED = (ARRAY, META)  # everything `pst-dist poison` writes into --out: nothing else there is ever replaced
LINF_ATTACKS = ("classwise_noise", "patch_noise", "em", "rem", "tap")
L2_ATTACKS = ("lsp", "ar")


def _is_store(out: Path) -> bool:
    """Is ``out`` an earlier `pst-dist poison` output (its poison.json names our format)?"""
    try:
        return read_json(out / META, META).get("format") == FORMAT
    except OutputError:
        return False


def write_poisoned(cfg: Config, out: Path, *, overwrite: bool = False, log: Callable[[str], None] = print) -> dict:
    """Poison every training image of ``cfg.data``'s source with ``cfg.poison`` and store it at ``out``.

    ``out`` is checked before anything is generated (:func:`pst_dist.io.check_out_dir`): it must be new, empty, or
    an earlier store to be replaced with ``overwrite``; OutputError otherwise, and nothing there is touched."""
    from ..data.beton import enter_out_dir, fingerprint, write_failed
    from ..data.sources import Split, load_splits
    from . import poison_train
    from .model_based import LAST_RUN

    if cfg.poison.kind in ("none", "file"):
        raise ConfigError(f"pst-dist poison: poison.kind={cfg.poison.kind!r} is not an attack to generate")
    out = Path(out)
    replace = check_out_dir(out, command="poison", marker=META, owned=OWNED, overwrite=overwrite, is_ours=_is_store)
    with contextlib.ExitStack() as stack:
        tmp = enter_out_dir(stack, out, replace)  # first: an unwritable --out fails before hours of em/rem/tap
        data = copy.deepcopy(cfg.data)
        data.val_from, data.train_size = "test", 0  # every image of the source's training split
        splits = load_splits(data)
        tr = splits.train
        order = torch.argsort(tr.index)  # back to the source's own order
        if len(order) != splits.source_train_size:
            raise ConfigError(f"pst-dist poison: expected all {splits.source_train_size} training images, got "
                              f"{len(order)}")
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
                "seconds": round(seconds, 2), "model_based": dict(LAST_RUN)}  # cleared above: only em/rem/tap fill it
        try:
            _fill(tmp, {ARRAY: lambda f: np.save(f, poisoned.numpy())}, meta, META, hash_of=ARRAY)
        except OSError as e:
            raise write_failed(out, e) from e
    return meta


def _fill(directory: Path, files: dict[str, Callable[[Path], None]], meta: dict, meta_name: str,
          hash_of: str | None) -> None:
    for name, write in files.items():
        write(directory / name)
    if hash_of is not None:
        meta[f"{Path(hash_of).stem}_sha256"] = sha256(directory / hash_of)
    (directory / meta_name).write_text(json.dumps(meta, indent=2))


def save_dir(out: Path, files: dict[str, Callable[[Path], None]], meta: dict, meta_name: str,
             hash_of: str | None = None) -> None:
    """Write ``files`` (name -> writer taking a path) and ``meta`` as JSON into a fresh directory, renamed to ``out``
    only once complete (an earlier ``out`` is replaced then, as a whole). For callers that own ``out`` outright (the
    bench's poison cache); user-named outputs go through :func:`write_poisoned`'s checks. ``hash_of``: record that
    file's SHA-256 in the metadata."""
    with atomic_dir(Path(out), replace=True) as tmp:
        _fill(tmp, files, meta, meta_name, hash_of)


# ---------------------------------------------------------------------------------------------------------------
# reading


def _meta_error(meta_file: Path, key: str, value: object, want: str) -> PoisonFileError:
    shown = repr(value) if len(repr(value)) <= 80 else repr(value)[:77] + "..."
    return PoisonFileError(f"{meta_file}: key {key!r} = {shown}: expected {want}")


def _number(meta_file: Path, obj: dict, key: str, where: str) -> float:
    v = obj.get(key)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
        raise _meta_error(meta_file, f"{where}{key}", v, "a finite number >= 0")
    return float(v)


def read_meta(path: Path) -> dict:
    """A store's poison.json, its keys and types checked: PoisonFileError naming the file and key otherwise."""
    meta_file = path / META
    if not meta_file.is_file():
        raise PoisonFileError(f"{path}: not a stored poison (no {META}; write one with `pst-dist poison`)")
    meta = read_json(meta_file, META, PoisonFileError)
    if meta.get("format") != FORMAT:
        raise _meta_error(meta_file, "format", meta.get("format"), repr(FORMAT))
    attack = meta.get("attack")
    if not isinstance(attack, str) or attack not in POISONS - {"none", "file"}:
        raise _meta_error(meta_file, "attack", attack, f"one of {sorted(POISONS - {'none', 'file'})}")
    shape = meta.get("shape")
    if not isinstance(shape, list) or len(shape) != 4 or not all(type(v) is int and v >= 1 for v in shape):
        raise _meta_error(meta_file, "shape", shape, "4 positive integers (N, C, H, W)")
    digest = meta.get(f"{Path(ARRAY).stem}_sha256")
    if not isinstance(digest, str) or len(digest) != 64:
        raise _meta_error(meta_file, f"{Path(ARRAY).stem}_sha256", digest, "a SHA-256 hex digest")
    for key in ("parameters", "norms"):
        if not isinstance(meta.get(key), dict):
            raise _meta_error(meta_file, key, meta.get(key), "a JSON object")
    for key in ("linf", "l2_max"):
        _number(meta_file, meta["norms"], key, "norms.")
    if attack in LINF_ATTACKS:
        _number(meta_file, meta["parameters"], "eps", "parameters.")
    if attack in L2_ATTACKS:
        _number(meta_file, meta["parameters"], "l2", "parameters.")
    return meta


def _check_budget(path: Path, meta: dict, clean: torch.Tensor, stored: torch.Tensor, eps: float) -> None:
    """The measured perturbation within the budget of the attack poison.json names, whatever its recorded norms
    say (they could be rewritten along with the array); L-inf attacks also within the reading config's eps."""
    from .shortcuts import l2_budget

    attack, params = meta["attack"], meta["parameters"]
    d = stored.to(torch.int16) - clean.to(torch.int16)
    if attack in LINF_ATTACKS:
        linf = int(d.abs().max()) if d.numel() else 0
        made, allowed = int(round(params["eps"] * 255)), int(round(eps * 255))  # the attacks' own rounding
        if linf > made:
            raise PoisonFileError(f"{path}: L-inf of the stored perturbation is {linf}/255, above the budget of the "
                                  f"{attack} attack recorded in {META} (parameters.eps = {made}/255): the array or "
                                  f"{META} was changed after it was written")
        if linf > allowed:
            raise PoisonFileError(f"{path}: L-inf of the stored perturbation is {linf}/255, above poison.eps = "
                                  f"{allowed}/255 (raise poison.eps to accept it)")
    elif attack in L2_ATTACKS:
        budget = l2_budget(PoisonConfig(kind=attack, l2=params["l2"]), tuple(clean.shape[1:]))
        l2 = norms(clean, stored)["l2_max"]
        if l2 > budget + 1e-6:  # the attacks assert the same bound on the rounded uint8 images
            raise PoisonFileError(f"{path}: L2 of the stored perturbation is {l2:.4f} in some image, above the "
                                  f"budget of the {attack} attack recorded in {META} ({budget:.4f}; parameters.l2 = "
                                  f"{params['l2']}): the array or {META} was changed after it was written")
    elif attack == "ops":
        l0 = int((d != 0).any(dim=1).flatten(1).sum(1).max()) if len(d) else 0
        if l0 > 1:
            raise PoisonFileError(f"{path}: the stored perturbation changes {l0} pixels of some image; the ops attack "
                                  f"changes at most 1 (L0 = 1): the array or {META} was changed after it was written")
    else:  # conv_blur: a class-wise convolution has no Lp bound to check
        print(f"[poison] {path}: {attack} has no Lp bound; only the file hash and the recorded norms are checked",
              file=sys.stderr)


def read_stored(path: Path, images: torch.Tensor, index: torch.Tensor, source_size: int, *, eps: float = 1.0,
                verify: bool = True) -> torch.Tensor:
    """The stored poisoned images for ``images`` (rows ``index`` of the source's training split), checked against
    the metadata (format, keys, shape, dtype; the file's SHA-256 when ``verify``: about 1 s per GB, skipped with
    --data.verify=false) and against these clean images: the perturbation measured here must stay within the
    budget of the recorded attack (L-inf attacks: also within ``eps``, the reading config's poison.eps) and within
    the norms recorded when the poison was made, or it was changed or made for another data set."""
    meta = read_meta(path)
    expect = [source_size, *images.shape[1:]]
    if meta["shape"] != expect:
        raise PoisonFileError(f"{path}: shape mismatch: expected {expect} (the source's training split), found "
                              f"{meta['shape']}")
    data_file = path / ARRAY
    if not data_file.is_file():
        raise PoisonFileError(f"{data_file}: missing")
    if verify and sha256(data_file) != meta[f"{Path(ARRAY).stem}_sha256"]:
        raise PoisonFileError(f"{data_file}: changed since it was written (SHA-256 differs from {META}; checking "
                              f"costs about 1 s per GB, --data.verify=false skips it)")
    try:
        arr = np.load(data_file, allow_pickle=False, mmap_mode="r")
    except Exception as e:  # noqa: BLE001 - any decoding failure is a bad file
        raise PoisonFileError(f"{data_file}: not a readable .npy array ({type(e).__name__}: {e})") from None
    if arr.dtype != np.uint8:  # stores hold exact pixel values; anything else would be trained unscaled
        raise PoisonFileError(f"{data_file}: dtype {arr.dtype}: a stored poison holds uint8 images")
    if list(arr.shape) != expect:
        raise PoisonFileError(f"{data_file}: array shape {list(arr.shape)}, expected {expect}")
    stored = torch.from_numpy(np.ascontiguousarray(arr[index.numpy()]))
    found, recorded = norms(images, stored), meta["norms"]
    for key in ("linf", "l2_max"):  # first: a poison made for other clean images exceeds everything
        if found[key] > recorded[key] + 1e-6:
            raise PoisonFileError(f"{path}: does not fit this data set: {key} of the perturbation is {found[key]:.4f} "
                                  f"here, {recorded[key]:.4f} when it was made (another data set or order?)")
    _check_budget(path, meta, images, stored, eps)
    return stored.contiguous()
