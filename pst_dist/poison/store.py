"""Lossless storage of a poisoned training set (``pst-dist poison``) and reading it back.

A stored poison is a directory: ``train_images.npy`` (uint8, N x C x H x W, every image of the source's training
split in the source's own order) and ``poison.json`` (attack, its parameters and seed, the clean data set's
fingerprint, the measured L-inf / L2 / L0 norms, generation time, the file's SHA-256). A store of some of the
source's training images only (``pst-dist bench`` caches each poison made on its cells' training split) holds them
sorted by source index, with ``rows.npy`` (int64, their source indices) beside them; poison.json then names it
(``rows``, with its SHA-256) and the source's size (``source_size``), and a training split that needs images the
store lacks is refused. It is built in a hidden sibling directory and renamed into place
(:func:`pst_dist.io.atomic_dir`), so an interrupted run leaves nothing that looks complete; an existing ``--out`` is
used only when empty, or replaced only when it holds an earlier store and ``--overwrite`` was given. Training reads it
with ``poison.kind = "file"`` and ``poison.path = <directory>``. ``pst-dist poison --import FILE`` stores a poison made
elsewhere the same way (attack ``file``, its L-inf budget ``parameters.eps``). A store holds every image poisoned;
``poison.ratio`` is applied when training reads it, so poison.json does not record it.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from ..config import POISONS, PoisonConfig
from ..io import OutputError, atomic_dir, read_json, sha256
from ..registry import ATTACKS
from .budget import PoisonFileError, l0_max, l2_budget, linf_levels, linf_of, norms

FORMAT = "pst-dist-poison/1"
META = "poison.json"
ARRAY = "train_images.npy"
ROWS = "rows.npy"  # a store of some of the source's training images: their source indices
OWNED = (ARRAY, META, ROWS)  # everything a store holds: nothing else in --out is ever replaced
LINF_ATTACKS = (*(n for n, e in ATTACKS.items() if e.data.get("budget") == "linf"), "file")  # the registry says;
# file: an imported poison, checked against the poison.eps it was imported with
L2_ATTACKS = tuple(n for n, e in ATTACKS.items() if e.data.get("budget") == "l2")
L0_ATTACKS = tuple(n for n, e in ATTACKS.items() if e.data.get("budget") == "l0")


def parameters(cfg: PoisonConfig) -> dict:
    """poison.json's ``parameters``: the poison settings, less ``ratio`` (applied when training reads the store)."""
    return {k: v for k, v in asdict(cfg).items() if k != "ratio"}


def is_store(out: Path) -> bool:
    """Is ``out`` an earlier `pst-dist poison` output (its poison.json names our format)?"""
    try:
        return read_json(out / META, META).get("format") == FORMAT
    except OutputError:
        return False


def _fill(directory: Path, files: dict[str, Callable[[Path], None]], meta: dict, meta_name: str,
          hash_of: str | Sequence[str] | None) -> None:
    for name, write in files.items():
        write(directory / name)
    for name in [hash_of] if isinstance(hash_of, str) else hash_of or []:
        meta[f"{Path(name).stem}_sha256"] = sha256(directory / name)
    (directory / meta_name).write_text(json.dumps(meta, indent=2))


def fill(directory: Path, poisoned: torch.Tensor, meta: dict, *, rows: torch.Tensor | None = None,
         source_size: int | None = None) -> None:
    """Write a store's array and metadata (shape and SHA-256s added) into ``directory`` (a fresh, hidden one).

    ``poisoned``: every training image of the source in its own order; or, with ``rows`` (their source indices, in
    any order) and ``source_size`` (the source's training images), some of them: stored sorted by source index, with
    ``rows.npy`` beside them unless they are every image of the source."""
    files: dict[str, Callable[[Path], None]] = {}
    if rows is not None:
        if source_size is None:
            raise ValueError("fill: rows without the source's size")
        order = torch.argsort(rows)
        rows, poisoned = rows[order].to(torch.int64), poisoned[order]
        if not torch.equal(rows, torch.arange(source_size)):
            if len(rows) and (int(rows[0]) < 0 or int(rows[-1]) >= source_size or bool((rows[1:] == rows[:-1]).any())):
                raise ValueError(f"fill: rows must be distinct source indices in [0, {source_size})")
            files[ROWS] = lambda f: np.save(f, rows.numpy())
            meta.update(rows=ROWS, source_size=source_size)
    meta["shape"] = list(poisoned.shape)
    files = {ARRAY: lambda f: np.save(f, poisoned.numpy()), **files}
    _fill(directory, files, meta, META, hash_of=list(files))


def save_dir(out: Path, files: dict[str, Callable[[Path], None]], meta: dict, meta_name: str,
             hash_of: str | None = None) -> None:
    """Write ``files`` (name -> writer taking a path) and ``meta`` as JSON into a fresh directory, renamed to ``out``
    only once complete (an earlier ``out`` is replaced then, as a whole). For callers that own ``out`` outright (the
    tests' hand-made stores); user-named outputs go through :func:`pst_dist.data.pipeline.write_poisoned`'s checks.
    ``hash_of``: record that file's SHA-256 in the metadata."""
    with atomic_dir(Path(out), replace=True) as tmp:
        _fill(tmp, files, meta, meta_name, hash_of)


# ---------------------------------------------------------------------------------------------------------------
# reading


def _meta_error(meta_file: Path, key: str, value: object, want: str) -> PoisonFileError:
    shown = repr(value) if len(repr(value)) <= 80 else repr(value)[:77] + "..."
    return PoisonFileError(f"{meta_file}: key {key!r} = {shown}: expected {want}")


def _number(meta_file: Path, obj: dict, key: str, where: str) -> float:
    v = obj.get(key)
    if isinstance(v, int) and not isinstance(v, bool) and v > 1e300:  # math.isfinite cannot take a 400-digit int
        v = float("inf")
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
    if not isinstance(attack, str) or attack not in POISONS - {"none"}:
        raise _meta_error(meta_file, "attack", attack, f"one of {sorted(POISONS - {'none'})}")
    shape = meta.get("shape")
    if not isinstance(shape, list) or len(shape) != 4 or not all(type(v) is int and v >= 1 for v in shape):
        raise _meta_error(meta_file, "shape", shape, "4 positive integers (N, C, H, W)")
    digest = meta.get(f"{Path(ARRAY).stem}_sha256")
    if not isinstance(digest, str) or len(digest) != 64:
        raise _meta_error(meta_file, f"{Path(ARRAY).stem}_sha256", digest, "a SHA-256 hex digest")
    if "rows" in meta:  # a store of some of the source's training images
        if meta["rows"] != ROWS:
            raise _meta_error(meta_file, "rows", meta["rows"], repr(ROWS))
        digest = meta.get(f"{Path(ROWS).stem}_sha256")
        if not isinstance(digest, str) or len(digest) != 64:
            raise _meta_error(meta_file, f"{Path(ROWS).stem}_sha256", digest, "a SHA-256 hex digest")
        size = meta.get("source_size")
        if type(size) is not int or size < shape[0]:
            raise _meta_error(meta_file, "source_size", size, f"an integer >= the {shape[0]} stored images")
    for key in ("parameters", "norms"):
        if not isinstance(meta.get(key), dict):
            raise _meta_error(meta_file, key, meta.get(key), "a JSON object")
    for key in ("linf", "l2_max"):
        _number(meta_file, meta["norms"], key, "norms.")
    if attack in LINF_ATTACKS and _number(meta_file, meta["parameters"], "eps", "parameters.") > 1:
        raise _meta_error(meta_file, "parameters.eps", meta["parameters"]["eps"], "at most 1 (pixel units of [0, 1])")
    if attack in L2_ATTACKS:
        _number(meta_file, meta["parameters"], "l2", "parameters.")
    return meta


def _check_budget(path: Path, meta: dict, clean: torch.Tensor, stored: torch.Tensor, eps: float) -> None:
    """The measured perturbation within the budget of the attack poison.json names, whatever its recorded norms
    say (they could be rewritten along with the array); L-inf attacks also within the reading config's eps."""

    attack, params = meta["attack"], meta["parameters"]
    if attack in LINF_ATTACKS:
        linf = linf_of(clean, stored)
        # the attacks' own rounding; a store made before it rounded down had round(eps * 255)
        made, allowed = max(linf_levels(params["eps"]), round(params["eps"] * 255)), linf_levels(eps)
        if linf > made:
            raise PoisonFileError(f"{path}: L-inf of the stored perturbation is {linf}/255, above the budget of the "
                                  f"{attack} attack recorded in {META} (parameters.eps = {made}/255): the array or "
                                  f"{META} was changed after it was written")
        if linf > allowed:
            raise PoisonFileError(f"{path}: L-inf of the stored perturbation is {linf}/255, above poison.eps={eps:g} "
                                  f"({allowed}/255 in whole pixel levels; raise poison.eps to accept it)")
    elif attack in L2_ATTACKS:
        budget = l2_budget(PoisonConfig(kind=attack, l2=params["l2"]), tuple(clean.shape[1:]))
        l2 = norms(clean, stored)["l2_max"]
        if l2 > budget + 1e-6:  # the attacks assert the same bound on the rounded uint8 images
            raise PoisonFileError(f"{path}: L2 of the stored perturbation is {l2:.4f} in some image, above the "
                                  f"budget of the {attack} attack recorded in {META} ({budget:.4f}; parameters.l2 = "
                                  f"{params['l2']}): the array or {META} was changed after it was written")
    elif attack in L0_ATTACKS:
        l0 = l0_max(clean, stored)
        if l0 > 1:
            raise PoisonFileError(f"{path}: the stored perturbation changes {l0} pixels of some image; the {attack} "
                                  f"attack changes at most 1 (L0 = 1): the array or {META} was changed after it was "
                                  f"written")
    else:  # conv_blur (budget "none"): a class-wise convolution has no Lp bound to check
        print(f"[poison] {path}: {attack} has no Lp bound; only the file hash and the recorded norms are checked",
              file=sys.stderr)


def _positions(path: Path, meta: dict, index: torch.Tensor, source_size: int, verify: bool) -> np.ndarray:
    """Where each of the source's rows ``index`` lies in a store of some of its training images (its rows.npy,
    checked); PoisonFileError naming how many of them the store lacks."""
    rows_file = path / ROWS
    if not rows_file.is_file():
        raise PoisonFileError(f"{rows_file}: missing ({META} names it)")
    if verify and sha256(rows_file) != meta[f"{Path(ROWS).stem}_sha256"]:
        raise PoisonFileError(f"{rows_file}: changed since it was written (SHA-256 differs from {META})")
    try:
        rows = np.load(rows_file, allow_pickle=False)
    except Exception as e:  # noqa: BLE001 - any decoding failure is a bad file
        raise PoisonFileError(f"{rows_file}: not a readable .npy array ({type(e).__name__}: {e})") from None
    n = meta["shape"][0]
    if rows.dtype != np.int64 or rows.shape != (n,):
        raise PoisonFileError(f"{rows_file}: {rows.dtype} {list(rows.shape)}, expected int64 [{n}] (the source "
                              f"index of each stored image)")
    if n and (rows[0] < 0 or rows[-1] >= source_size or bool((np.diff(rows) <= 0).any())):
        raise PoisonFileError(f"{rows_file}: expected distinct source indices in [0, {source_size}), sorted")
    want = index.numpy()
    pos = np.searchsorted(rows, want)
    found = pos < n
    found[found] = rows[pos[found]] == want[found]
    if not found.all():
        missing = int((~found).sum())
        raise PoisonFileError(f"{path}: holds {n} of the source's {source_size} training images, made for another "
                              f"training split: {missing} of the {len(want)} images this one trains on are not in it "
                              f"(make a poison of every training image with `pst-dist poison`)")
    return pos


def read_stored(path: Path, images: torch.Tensor, index: torch.Tensor, source_size: int, *, eps: float = 1.0,
                verify: bool = True) -> torch.Tensor:
    """The stored poisoned images for ``images`` (rows ``index`` of the source's training split; a store of some of
    its images must hold each of these), checked against the metadata (format, keys, shape, dtype, rows; the files'
    SHA-256 when ``verify``: about 1 s per GB, skipped with --data.verify=false) and against these clean images: the
    perturbation measured here must stay within the budget of the recorded attack (L-inf attacks: also within
    ``eps``, the reading config's poison.eps) and within the norms recorded when the poison was made, or it was
    changed or made for another data set."""
    meta = read_meta(path)
    subset = "rows" in meta
    if subset and meta["source_size"] != source_size:
        raise PoisonFileError(f"{path}: made for a source of {meta['source_size']} training images; this one has "
                              f"{source_size}")
    expect = [meta["shape"][0] if subset else source_size, *images.shape[1:]]
    if meta["shape"] != expect:
        what = "its stored images of the source's training split" if subset else "the source's training split"
        raise PoisonFileError(f"{path}: shape mismatch: expected {expect} ({what}), found {meta['shape']}")
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
    take = _positions(path, meta, index, source_size, verify) if subset else index.numpy()
    stored = torch.from_numpy(np.ascontiguousarray(arr[take]))
    found, recorded = norms(images, stored), meta["norms"]
    for key in ("linf", "l2_max"):  # first: a poison made for other clean images exceeds everything
        if found[key] > recorded[key] + 1e-6:
            raise PoisonFileError(f"{path}: does not fit this data set: {key} of the perturbation is {found[key]:.4f} "
                                  f"here, {recorded[key]:.4f} when it was made (another data set or order?)")
    _check_budget(path, meta, images, stored, eps)
    return stored.contiguous()
