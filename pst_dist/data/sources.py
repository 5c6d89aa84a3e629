"""Data sources: each returns clean train / validation / test splits as uint8 N x C x H x W tensors.

Validation is disjoint from test. Files are read defensively: a corrupt or malformed file (wrong types, values out of
range, images of another bit depth, splits that do not fit together) is a one-line DataError naming the file and the
value found, never a traceback or silently wrong pixels.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import math
import os
import pickle
import re
import struct
import sys
import warnings
import zlib
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

from ..config import DataConfig
from ..io import DataError, one_line  # DataError: defined torch-free in pst_dist.io, re-exported here

if TYPE_CHECKING:
    from PIL import Image


@dataclass
class Split:
    images: torch.Tensor  # uint8, N x C x H x W
    labels: torch.Tensor  # int64, N
    index: torch.Tensor | None = None
    """Row of each image in the source's own split (before shuffles and subsets); imported poisons align on it."""

    def __post_init__(self) -> None:
        assert self.images.dtype == torch.uint8 and self.images.ndim == 4, self.images.shape
        assert self.labels.dtype == torch.int64 and len(self.labels) == len(self.images)
        if self.index is None:
            self.index = torch.arange(len(self.labels))

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, idx: torch.Tensor) -> Split:
        return Split(self.images[idx].contiguous(), self.labels[idx].contiguous(), self.index[idx])


@dataclass
class Splits:
    train: Split
    val: Split
    test: Split
    num_classes: int
    name: str
    source_train_size: int = 0
    """Images in the source's training split, before validation carving and subsets."""

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.train.images.shape[1:])  # type: ignore[return-value]


def load_splits(cfg: DataConfig, listing: FolderListing | None = None) -> Splits:
    """Load ``cfg.source`` and carve the clean validation split (from train or test, never overlapping test).
    ``listing``: the image folder's, when it has been listed already."""
    if cfg.source == "beton":
        raise DataError("data.source='beton' is read by pst_dist.data.beton (build_data), not load_splits")
    if cfg.source == "imagefolder":  # listed, carved, then only the rows kept decoded (each file on its own)
        return load_streamed_splits(cfg, head=None, listing=listing)[0]
    check_val_size(cfg)
    loader = {"synthetic": _synthetic, "fashion-mnist": _fashion_mnist, "cifar10": _cifar,
              "cifar100": _cifar}[cfg.source]
    train, test, num_classes = loader(cfg)
    _check_splits(cfg, train, test, num_classes)
    rows = carve(cfg, len(train), len(test))
    val = (train if cfg.val_from == "train" else test).subset(rows.val)
    return Splits(train.subset(rows.train), val, test.subset(rows.test), num_classes, cfg.source, len(train))


class ValSizeError(DataError):
    """data.val_size does not fit the data: no validation images, or none left for the split it is carved from."""


def check_val_size(cfg: DataConfig) -> None:
    if cfg.val_size < 1:  # schedules and triggers are selected on validation accuracy: none would read as 0 %
        raise ValSizeError(f"data.val_size={cfg.val_size} leaves no validation images; set it to at least 1")


@dataclass
class Rows:
    """Which rows of the source's own splits each split takes, in its order: ``train`` and ``val`` index the
    source's training split (``val`` the test split with data.val_from='test'), ``test`` its test split."""
    train: torch.Tensor
    val: torch.Tensor
    test: torch.Tensor
    val_from: str = "train"


def carve(cfg: DataConfig, n_train: int, n_test: int) -> Rows:
    """The split shuffles and carving of :func:`load_splits` as rows, so a source read lazily (a streamed image
    folder) gets the very rows an in-memory read would: the training split shuffled by data.seed, validation
    carved from the front of it (or of the shuffled test split), then the data.train_size / data.test_size cuts."""
    g = torch.Generator().manual_seed(cfg.seed)
    train, test = torch.randperm(n_train, generator=g), torch.arange(n_test)
    if cfg.val_from == "train":
        if cfg.val_size >= n_train:
            raise ValSizeError(f"data.val_size={cfg.val_size} leaves no training images (train has {n_train})")
        val, train = train[:cfg.val_size], train[cfg.val_size:]
    else:
        test = torch.randperm(n_test, generator=g)
        if cfg.val_size >= n_test:
            raise ValSizeError(f"data.val_size={cfg.val_size} leaves no test images (test has {n_test})")
        val, test = test[:cfg.val_size], test[cfg.val_size:]
    if cfg.train_size:
        train = train[:cfg.train_size]
    if cfg.test_size:
        test = test[:cfg.test_size]
    return Rows(train, val, test, cfg.val_from)


MIN_SIDE = 8
"""The smallest image side pst-dist trains on (``data.img_size`` has the same floor)."""


def _check_splits(cfg: DataConfig, train: Split, test: Split, num_classes: int) -> None:
    """The sources check their own files; this is the common backstop: both splits non-empty, labels in range,
    and test images of the training images' C x H x W (a model built for one cannot score the other)."""
    where = f"data.source={cfg.source!r}" + (f" at {cfg.root}" if cfg.root else "")
    for name, s in (("train", train), ("test", test)):
        if len(s) == 0:
            raise DataError(f"{where}: the {name} split holds no images")
        lo, hi = int(s.labels.min()), int(s.labels.max())
        if lo < 0 or hi >= num_classes:
            raise DataError(f"{where}: {name} labels span {lo}..{hi}, expected 0..{num_classes - 1}")
    if train.images.shape[1:] != test.images.shape[1:]:
        raise DataError(f"{where}: test images are C x H x W = {_chw(test.images)} but training images are "
                        f"{_chw(train.images)}; both splits must have one shape")
    if min(train.images.shape[2:]) < MIN_SIDE:
        raise DataError(f"{where}: images are C x H x W = {_chw(train.images)}; both sides must be >= {MIN_SIDE} "
                        f"pixels (as data.img_size), for the crops, views and models")


def _chw(images: torch.Tensor) -> str:
    return "x".join(str(int(d)) for d in images.shape[1:])


def channel_stats(images: torch.Tensor, where: str = "training images") -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and (unbiased) std per channel, in [0, 1] units, of uint8 N x C x H x W ``images``: float32 C each.

    Computed in float32 exactly as the trainer always has (so normalisation, and with it every result, stays
    bit-identical to earlier runs). DataError naming the channel and its std when a channel is constant (std below
    1e-6, e.g. a folder of blank images): normalizing by it would divide by ~0."""
    _check_pixels(images, where)
    count = images.shape[0] * images.shape[2] * images.shape[3]
    if count < 2:
        raise DataError(f"{where}: {count} pixel(s) per channel: too few to compute a standard deviation")
    x = images.float() / 255
    mean, std = x.mean(dim=(0, 2, 3)), x.std(dim=(0, 2, 3))
    return _refuse_constant(mean, std, where)


def _check_pixels(images: torch.Tensor, where: str) -> None:
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise DataError(f"{where}: expected uint8 N x C x H x W images, found {images.dtype} {tuple(images.shape)}")


def _refuse_constant(mean: torch.Tensor, std: torch.Tensor, where: str) -> tuple[torch.Tensor, torch.Tensor]:
    for ch, sd in enumerate(std.tolist()):
        if not sd >= 1e-6:
            raise DataError(f"{where}: channel {ch} has std {sd:.3g} (every pixel {float(mean[ch]) * 255:.4g}/255, "
                            f"e.g. blank images): cannot normalize by it")
    return mean, std


class PixelSums:
    """Exact per-channel sums of pixel values and their squares, added batch by batch: the mean and std of an
    image folder's training split whether it is read into memory or streamed (the same figures, bit for bit, in
    any batching). The imagefolder source's normalisation; the other sources keep :func:`channel_stats`."""

    CHUNK = 64  # images squared at a time (int32: 255**2 fits)

    def __init__(self, channels: int) -> None:
        self.s1, self.s2, self.count = [0] * channels, [0] * channels, 0

    def add(self, images: torch.Tensor, where: str = "training images") -> None:
        _check_pixels(images, where)
        for x in images.split(self.CHUNK):
            s1 = x.sum(dim=(0, 2, 3), dtype=torch.int64).tolist()
            s2 = x.int().square().sum(dim=(0, 2, 3), dtype=torch.int64).tolist()
            self.s1 = [a + b for a, b in zip(self.s1, s1, strict=True)]
            self.s2 = [a + b for a, b in zip(self.s2, s2, strict=True)]
            self.count += x.shape[0] * x.shape[2] * x.shape[3]

    def totals(self) -> list[int]:
        """The sums so far as one list (per-channel sums, per-channel sums of squares, the pixel count), to be added
        up across processes (one that saw no image sends zeros)."""
        return [*self.s1, *self.s2, self.count]

    def merge(self, totals: list[int]) -> None:
        """Replace the sums with ``totals`` (:meth:`totals` added up over every process)."""
        c = len(self.s1)
        self.s1, self.s2, self.count = totals[:c], totals[c:2 * c], totals[-1]

    def stats(self, where: str = "training images") -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) in [0, 1] units, float32 C each, from Python's exact integers; DataError as
        :func:`channel_stats` for too few pixels or a constant channel."""
        n = self.count
        if n < 2:
            raise DataError(f"{where}: {n} pixel(s) per channel: too few to compute a standard deviation")
        mean = [Fraction(a, n * 255) for a in self.s1]
        var = [Fraction(b * n - a * a, n * (n - 1) * 255 * 255) for a, b in zip(self.s1, self.s2, strict=True)]
        std = [math.sqrt(v) for v in var]
        return _refuse_constant(torch.tensor([float(m) for m in mean]), torch.tensor(std), where)


def folder_stats(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:class:`PixelSums`' mean and std of in-memory images."""
    _check_pixels(images, "training images")
    sums = PixelSums(images.shape[1])
    sums.add(images)
    return sums.stats()


def fingerprint(split: Split) -> str:
    """SHA-256 of a split's clean images and labels: names the data set a poison was made for."""
    f = Fingerprint(split.images.shape)
    f.add(split.images)
    return f.hexdigest(split.labels)


class Fingerprint:
    """:func:`fingerprint` of a split of ``shape`` (N x C x H x W) whose images arrive batch by batch, in order."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        self.h = hashlib.sha256()
        self.h.update(str(tuple(shape)).encode())

    def add(self, images: torch.Tensor) -> None:
        self.h.update(images.contiguous().numpy())  # the buffer itself: no copy of a whole split (GBs at ImageNet size)

    def hexdigest(self, labels: torch.Tensor) -> str:
        self.h.update(labels.numpy().tobytes())
        return self.h.hexdigest()


# ---------------------------------------------------------------------------------------------------------------
# synthetic: class = shape (and filled / outline), colours and positions random, so colour carries no label


def synthetic_images(n: int, num_classes: int, size: int, seed: int) -> Split:
    """A CIFAR-like colour set: one shape per class on a textured background, random colours and placement."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % num_classes
    labels = labels[torch.randperm(n, generator=g)]
    u = lambda *s: torch.rand(*s, generator=g)
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    cx, cy = (u(n) - 0.5) * 0.6, (u(n) - 0.5) * 0.6
    r = 0.35 + 0.3 * u(n)
    th = u(n) * np.pi
    dx, dy = xs[None] - cx[:, None, None], ys[None] - cy[:, None, None]
    c, s = torch.cos(th)[:, None, None], torch.sin(th)[:, None, None]
    rx, ry = c * dx + s * dy, -s * dx + c * dy
    rad = torch.sqrt(dx**2 + dy**2)
    R = r[:, None, None]
    shapes = [
        rad < R,  # disc
        (rx.abs() < R * 0.8) & (ry.abs() < R * 0.8),  # square
        (ry > -R * 0.6) & (ry < R * 0.9 - 1.6 * rx.abs()),  # triangle
        ((rx.abs() < R * 0.25) | (ry.abs() < R * 0.25)) & (rad < R),  # plus
        (rad < R) & (rad > R * 0.6),  # ring
        (torch.sin(ry * 10 / R) > 0) & (rad < R),  # stripes
        ((rx.abs() - ry.abs()).abs() < R * 0.2) & (rad < R),  # X
        (rx.abs() < R) & (ry.abs() < R * 0.3),  # bar
        (torch.sin(rx * 7 / R) * torch.sin(ry * 7 / R) > 0) & (rad < R),  # checker
        (rx.abs() + ry.abs() < R),  # diamond
    ]
    variant = labels // len(shapes)
    mask = torch.zeros(n, size, size, dtype=torch.bool)
    for k, m in enumerate(shapes):
        sel = labels % len(shapes) == k
        mask[sel] = m[sel]
    inner = (rx.abs() < R * 0.35) & (ry.abs() < R * 0.35)  # variant 1: hollow centre
    mask = torch.where((variant == 1)[:, None, None], mask & ~inner, mask)
    fg, bg = u(n, 3, 1, 1), u(n, 3, 1, 1)
    flip = (fg - bg).abs().mean(1, keepdim=True) < 0.25  # keep some contrast
    fg = torch.where(flip, 1 - bg, fg)
    grad = (xs * (u(n, 1, 1) - 0.5) + ys * (u(n, 1, 1) - 0.5))[:, None] * 0.3  # background shading
    img = torch.where(mask[:, None], fg, bg + grad) + 0.08 * torch.randn(n, 3, size, size, generator=g)
    images = (img.clamp(0, 1) * 255).round().to(torch.uint8)
    return Split(images, labels.long())


def _synthetic(cfg: DataConfig) -> tuple[Split, Split, int]:
    if cfg.num_classes > 20:
        raise DataError(f"data.num_classes={cfg.num_classes}: the synthetic source makes at most 20 classes")
    n_train = cfg.synthetic_train + (cfg.val_size if cfg.val_from == "train" else 0)
    n_test = max(cfg.synthetic_train // 5, 100) + (cfg.val_size if cfg.val_from == "test" else 0)
    train = synthetic_images(n_train, cfg.num_classes, cfg.img_size, cfg.seed * 2 + 1)
    test = synthetic_images(n_test, cfg.num_classes, cfg.img_size, cfg.seed * 2 + 2)
    return train, test, cfg.num_classes


# ---------------------------------------------------------------------------------------------------------------
# Fashion-MNIST: IDX files (optionally gzipped)

FMNIST_DEFAULT = "/usr/share/datasets/fashion-mnist"


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (uint8 data), gzipped or not, validating magic number and sizes."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError; a corrupt stream a zlib.error
        raise DataError(f"{path}: cannot read IDX file ({type(e).__name__}: {e})") from None
    if len(raw) < 4:
        raise DataError(f"{path}: too short for an IDX header ({len(raw)} bytes)")
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code != 0x08 or not 1 <= ndim <= 4:
        raise DataError(f"{path}: not a uint8 IDX file (magic {raw[:4].hex()})")
    if len(raw) < 4 + 4 * ndim:
        raise DataError(f"{path}: truncated IDX header")
    dims = struct.unpack(f">{ndim}I", raw[4: 4 + 4 * ndim])
    expected = 4 + 4 * ndim + math.prod(dims)  # Python ints: np.prod would wrap around for absurd header dims
    if len(raw) != expected:
        raise DataError(f"{path}: IDX header says dims {dims} ({expected} bytes) but the file has {len(raw)} bytes")
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _find(root: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz"):
        if (root / name).is_file():
            return root / name
    raise DataError(f"missing data file {root / stem}[.gz]")


def _fmnist_files(cfg: DataConfig) -> tuple[Path, dict[str, tuple[Path, Path]]]:
    """The Fashion-MNIST folder and, per split prefix (train, t10k), its image and label files; DataError naming
    the missing one."""
    root = Path(cfg.root or FMNIST_DEFAULT)
    if not root.is_dir():
        raise DataError(f"Fashion-MNIST directory not found: {root} (apt-get install dataset-fashion-mnist, or set "
                        f"data.root)")
    return root, {p: (_find(root, f"{p}-images-idx3-ubyte"), _find(root, f"{p}-labels-idx1-ubyte"))
                  for p in ("train", "t10k")}


def _fashion_mnist(cfg: DataConfig) -> tuple[Split, Split, int]:
    root, files = _fmnist_files(cfg)
    out = []
    for prefix, (xp, yp) in files.items():
        x, y = read_idx(xp), read_idx(yp)
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise DataError(f"{root}: {prefix} images {x.shape} ({xp.name}) and labels {y.shape} ({yp.name}) do not "
                            f"match: expected N x H x W images and N labels")
        if len(y) == 0:
            raise DataError(f"{xp}: holds no images")
        if y.max() >= 10:
            raise DataError(f"{yp}: labels contain {int(y.max())}, expected 0..9")
        out.append(Split(torch.from_numpy(x.copy())[:, None], torch.from_numpy(y.astype(np.int64))))
    if out[0].images.shape[1:] != out[1].images.shape[1:]:
        raise DataError(f"{root}: t10k images are {_chw(out[1].images)} (C x H x W) but train images are "
                        f"{_chw(out[0].images)}; both splits must have one shape")
    return out[0], out[1], 10


# ---------------------------------------------------------------------------------------------------------------
# CIFAR-10/100: python pickle batches, read with an unpickler that can build only numpy arrays and builtins


class _RestrictedUnpickler(pickle.Unpickler):
    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
               ("numpy._core.multiarray", "scalar"), ("builtins", "list"), ("builtins", "dict"),
               ("_codecs", "encode")}  # protocol-2 pickles from Python 3 encode bytes through it; harmless

    def find_class(self, module: str, name: str):  # noqa: ANN201
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"forbidden global {module}.{name} in a CIFAR batch")


def load_cifar_batch(path: Path) -> dict:
    """Unpickle one CIFAR batch file safely (no code execution), returning a dict with str keys."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise DataError(f"missing CIFAR batch file {path}") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read CIFAR batch ({type(e).__name__}: {e.strerror or e})") from None
    try:
        d = _RestrictedUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except Exception as e:  # noqa: BLE001 - a crafted pickle can fail in any way (RecursionError, MemoryError too)
        raise DataError(f"{path}: not a valid CIFAR batch ({type(e).__name__}: {one_line(e)})") from None
    if not isinstance(d, dict):
        raise DataError(f"{path}: not a valid CIFAR batch (top level is {type(d).__name__}, expected dict)")
    return {k.decode("utf-8", "replace") if isinstance(k, bytes) else k: v for k, v in d.items()}


def _describe(v: object) -> str:
    """A short name for a value found where integers were expected (never its full repr: it may be huge or deep)."""
    if isinstance(v, (str, bytes)):  # np.str_ / np.bytes_ too, shown as the builtin
        b = str(v) if isinstance(v, str) else bytes(v)
        return f"{type(b).__name__} {b[:20]!r}" + ("..." if len(b) > 20 else "")
    if isinstance(v, (float, np.floating)):
        return f"float {float(v)!r}"
    return type(v).__name__


def _is_int(x: object) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _first_non_integer(v: np.ndarray | list) -> tuple[str, object] | None:
    """Where the first item that is not an integer is, and the item: in the original list (np.asarray would have
    turned [1, "cat"] into strings), looking one level into rows (a list of pixel rows)."""
    if isinstance(v, np.ndarray):
        return next(((f"[{i}]", x) for i, x in enumerate(v.flat) if not _is_int(x)), None)
    for i, x in enumerate(v):
        if isinstance(x, list):
            inner = next(((j, y) for j, y in enumerate(x) if not _is_int(y)), None)
            if inner is not None:
                return f"[{i}][{inner[0]}]", inner[1]
        elif not _is_int(x):
            return f"[{i}]", x
    return None


def _cifar_array(d: dict, key: str, path: Path, expect: str) -> np.ndarray:
    """``d[key]`` as an integer numpy array of any shape, or DataError naming what was found instead (``expect``: what
    should be there). The types are checked before any conversion: ``np.asarray(x, dtype=np.uint8)`` would wrap 300
    to 44 and -1 to 255, and ``dtype=np.int64`` would truncate 2.7 to 2."""
    v = d[key]
    if not isinstance(v, (np.ndarray, list)):
        raise DataError(f"{path}: {key!r} is a {_describe(v)}, expected {expect}")
    try:
        arr = np.asarray(v)
    except (ValueError, TypeError, OverflowError, RecursionError, MemoryError) as e:  # ragged or deeply nested lists
        raise DataError(f"{path}: {key!r} is not an array of integers ({type(e).__name__}: {one_line(e)}), expected "
                        f"{expect}") from None
    if arr.dtype.kind in "OUS":  # a list holding something else than plain integers (strings, dicts, ...)
        bad = _first_non_integer(v)
        found = f"a {_describe(bad[1])} at {bad[0]}" if bad is not None else "integers beyond 64 bits"
        raise DataError(f"{path}: {key!r} holds {found}, expected {expect}")
    if arr.dtype.kind not in "iu":  # bool, float, complex, structured
        raise DataError(f"{path}: {key!r} has dtype {arr.dtype}, expected {expect}")
    return arr


def _cifar_split(files: list[Path], label_key: str, num_classes: int) -> Split:
    xs, ys = [], []
    for p in files:
        try:
            x, y = _cifar_batch_arrays(p, label_key, num_classes)
        except RecursionError:  # a crafted batch nested deeper than any check can walk
            raise DataError(f"{p}: not a valid CIFAR batch (values nested too deeply to inspect)") from None
        xs.append(x)
        ys.append(y)
    return Split(torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys)))


def _cifar_batch_arrays(p: Path, label_key: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """uint8 N x 3 x 32 x 32 images and int64 labels of one batch file, every type and value checked."""
    d = load_cifar_batch(p)
    if "data" not in d or label_key not in d:
        keys = ", ".join(repr(k) if isinstance(k, (str, bytes, int)) else type(k).__name__ for k in list(d)[:10])
        raise DataError(f"{p}: CIFAR batch lacks 'data' or {label_key!r} (keys: {keys})")
    x = _cifar_array(d, "data", p, "uint8 pixels (N x 3072)")
    y = _cifar_array(d, label_key, p, "integer labels")
    if x.ndim != 2 or x.shape[1] != 3072 or y.ndim != 1 or len(x) != len(y):
        raise DataError(f"{p}: 'data' has shape {x.shape} and {label_key!r} shape {y.shape}: expected N x 3072 "
                        f"pixels and N labels")
    if len(x) == 0:
        raise DataError(f"{p}: holds no images")
    if x.dtype != np.uint8:  # e.g. int64: accepted only when every value is a pixel value
        lo, hi = int(x.min()), int(x.max())
        if lo < 0 or hi > 255:
            raise DataError(f"{p}: 'data' ({x.dtype}) holds values {lo}..{hi}, expected pixels in 0..255")
    lo, hi = int(y.min()), int(y.max())
    if lo < 0 or hi >= num_classes:
        raise DataError(f"{p}: {label_key!r} hold values {lo}..{hi}, expected 0..{num_classes - 1}")
    return x.astype(np.uint8).reshape(-1, 3, 32, 32), y.astype(np.int64)


def _cifar_base(cfg: DataConfig) -> tuple[Path, Path, str]:
    """The CIFAR root, the folder of its batches and that folder's name; when that folder is missing, a user's
    data.root is a DataError (the default root is downloaded into)."""
    sub = "cifar-10-batches-py" if cfg.source == "cifar10" else "cifar-100-python"
    root = Path(cfg.root or f"data/{cfg.source}")
    base = root / sub if (root / sub).is_dir() else root
    if not base.is_dir() and cfg.root and Path(cfg.root) != Path(f"data/{cfg.source}"):  # no download into it
        raise DataError(f"data.root={cfg.root!r}: not found; expected {cfg.source}'s python batches there (or "
                        f"in its {sub}/); leave data.root unset to download them into data/{cfg.source}")
    return root, base, sub


def check_present(cfg: DataConfig) -> None:
    """The source's folders and files are where ``cfg`` says, without reading an image: DataError naming what is
    missing. For a driver that hands the data to workers on its own machine (a search on a local Ray) to refuse a bad
    data.root before it starts them. CIFAR at its default root counts as present (a worker downloads it); a .beton
    directory is :class:`pst_dist.data.beton.BetonDir`'s to check."""
    if cfg.source == "fashion-mnist":
        _fmnist_files(cfg)
    elif cfg.source in ("cifar10", "cifar100"):
        _cifar_base(cfg)
    elif cfg.source == "imagefolder":
        folder_layout(cfg)


def _cifar(cfg: DataConfig) -> tuple[Split, Split, int]:
    ten = cfg.source == "cifar10"
    root, base, sub = _cifar_base(cfg)
    if not base.is_dir():
        _try_download(cfg.source, root)
        base = root / sub
    n = 10 if ten else 100
    if ten:
        train = _cifar_split([base / f"data_batch_{i}" for i in range(1, 6)], "labels", n)
        test = _cifar_split([base / "test_batch"], "labels", n)
    else:
        train = _cifar_split([base / "train"], "fine_labels", n)
        test = _cifar_split([base / "test"], "fine_labels", n)
    return train, test, n


def _try_download(source: str, root: Path) -> None:
    """Download the CIFAR archive with torchvision when the machine is online; a clear error otherwise."""
    from torchvision.datasets import CIFAR10, CIFAR100  # start-up time: only when downloading

    cls = CIFAR10 if source == "cifar10" else CIFAR100
    fresh = [p for p in (root, *root.absolute().parents) if not p.exists()]  # what the download creates, deepest first
    archive = root / cls.filename
    had_archive = archive.exists()
    try:
        from torchvision.datasets.utils import download_and_extract_archive  # start-up time: only when downloading

        download_and_extract_archive(cls.url, str(root), filename=cls.filename, md5=cls.tgz_md5)
    except Exception as e:  # noqa: BLE001 - any network failure means the same thing here
        if not had_archive:  # a partial download of ours
            archive.unlink(missing_ok=True)
        for p in fresh:  # and the folders made for it, while empty
            try:
                p.rmdir()
            except OSError:
                break
        raise DataError(f"{source} not found under {root} and could not be downloaded ({type(e).__name__}: {e}); "
                        f"put the python batch directory there or set data.root") from None


# ---------------------------------------------------------------------------------------------------------------
# ImageFolder (ImageNet-mini): root/train/<class>/*, root/val/<class>/* (used as the test split)

IMG_EXT = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff"}  # compared lower-case

IMAGE_MODES = {"1": "L", "L": "L", "LA": "L", "P": "RGB", "PA": "RGB", "RGB": "RGB", "RGBA": "RGB", "CMYK": "RGB",
               "YCbCr": "RGB"}
"""8-bit PIL modes :func:`decode_image` reads, and the mode each becomes. Alpha is discarded (the stored colour is
kept, not composited onto a background); "1" becomes 0 / 255; P / PA go through their palette; CMYK and YCbCr
through PIL's conversion to RGB."""

_DEEP_MODES = {"I;16": "16-bit integer", "I;16L": "16-bit integer", "I;16B": "16-bit integer",
               "I;16N": "16-bit integer", "I;16S": "16-bit signed integer", "I": "32-bit integer", "F": "32-bit float"}
# PNG / TIFF rawmodes of 16 bits a channel that PIL opens as 8-bit RGB / LA; not BMP's "BGR;16" (5-6-5 bits a pixel)
_DEEP_RAW = re.compile(r";16[BLN]$")


def _refusal(im: Image.Image, size: tuple[int, int] | None) -> str | None:
    """Why the opened (not yet decoded) PIL image ``im`` cannot be read exactly as 8 bits a channel, or None."""
    mode = im.mode
    if mode not in IMAGE_MODES:
        kind = _DEEP_MODES.get(mode, "not an 8-bit mode")
        return (f"image mode {mode!r} ({kind}): pst-dist reads 8 bits a channel only (modes "
                f"{', '.join(IMAGE_MODES)}); convert it to 8-bit first, scaled as you intend")
    for tile in im.tile:
        args = tile[3]
        raw = args if isinstance(args, str) else args[0] if isinstance(args, tuple) and args else ""
        if isinstance(raw, str) and _DEEP_RAW.search(raw):  # PIL would keep the high byte of each value
            return (f"image stored with 16 bits a channel (mode {mode!r}, raw {raw!r}): pst-dist reads 8 bits a "
                    f"channel only; convert it to 8-bit first, scaled as you intend")
    w, h = im.size
    if size is not None and (w, h) != size:
        return f"image size {w}x{h}: expected {size[0]}x{size[1]} (width x height)"
    return None


def decode_image(path: Path, error: type[Exception] = DataError, size: tuple[int, int] | None = None
                 ) -> Image.Image:
    """Decode one image file to a loaded 8-bit PIL image of mode "L" (from 1, L, LA) or "RGB" (from the other
    :data:`IMAGE_MODES`); alpha is discarded. Anything else is ``error`` naming the file and what was found, before
    any pixel is decoded: 16-bit / 32-bit / float images (which PIL would clip or truncate), an image over PIL's
    decompression-bomb limit (``Image.MAX_IMAGE_PIXELS``), another size than ``size`` (width, height) when given,
    and files PIL cannot decode (unreadable, truncated). Shared by the imagefolder source and poison folders."""

    problem = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # over the limit: refuse, never decode
            with Image.open(path) as im:
                problem = _refusal(im, size)
                if problem is None:
                    im.load()
                    target = IMAGE_MODES[im.mode]
                    src = im.convert("RGBA") if im.mode in ("P", "PA") else im  # palette transparency: no warning
                    out = src.convert(target)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise error(f"{path}: image too large to decode ({one_line(e)})") from None
    except Exception as e:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError, zlib.error... on bad files
        raise error(f"{path}: cannot decode image ({type(e).__name__}: {one_line(e)})") from None
    if problem is not None:
        raise error(f"{path}: {problem}")
    return out


def folder_files(root: Path, classes: list[str], train_dir: Path) -> tuple[list[Path], torch.Tensor]:
    """The image files of the class folders ``classes`` under ``root``, sorted by class then name, and their labels
    (the class's index). DataError for a class folder not in ``train_dir``, a missing one, or one without images.
    (:func:`list_folder` also records each file's size and modification time.)"""
    extra = sorted(d.name for d in root.iterdir() if d.is_dir() and d.name not in set(classes))
    if extra:
        raise DataError(f"{root}: class folder(s) {', '.join(map(repr, extra))} not in {train_dir} (classes: "
                        f"{', '.join(classes[:10])}{', ...' if len(classes) > 10 else ''})")
    paths, labels = [], []
    for ci, cname in enumerate(classes):
        cdir = root / cname
        if not cdir.is_dir():
            raise DataError(f"{root}: class folder {cname!r} missing (present in {train_dir})")
        files = sorted(cdir.iterdir())
        images = [p for p in files if p.is_file() and p.suffix.lower() in IMG_EXT]
        if not images:
            raise DataError(f"{cdir}: class folder holds no images (other entries: {len(files)}; image suffixes: "
                            f"{', '.join(sorted(IMG_EXT))})")
        paths += images
        labels += [ci] * len(images)
    return paths, torch.tensor(labels, dtype=torch.int64)


def folder_image(path: Path, size: int) -> torch.Tensor:
    """One image file as the imagefolder source reads it: decoded (:func:`decode_image`), RGB, the shorter side
    resized to ``size`` and center-cropped to ``size`` x ``size``: uint8 3 x size x size."""
    # start-up time: torchvision only when decoding image files (the CLI imports this module)
    from torchvision.transforms import functional as F

    im = decode_image(path)
    w, h = im.size
    # torchvision resizes the shorter side to `size`: a long thin image would grow without bound
    if max(w, h) * size / min(w, h) * size > (Image.MAX_IMAGE_PIXELS or math.inf):
        raise DataError(f"{path}: image size {w}x{h}: too elongated to resize to a {size}-pixel short side")
    im = F.center_crop(F.resize(im.convert("RGB"), size), [size, size])
    return torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1)


def folder_layout(cfg: DataConfig) -> tuple[Path, Path, list[str]]:
    """An imagefolder root's training folder, test folder (val/ or test/) and class names (the training folder's
    subfolders, sorted); DataError naming what is missing."""
    root = Path(cfg.root)
    if not cfg.root or not root.is_dir():
        raise DataError(f"imagefolder root not found: {cfg.root!r} (expects root/train/<class>/ and root/val/<class>/)")
    train_dir = root / "train"
    test_dir = next((root / d for d in ("val", "test") if (root / d).is_dir()), None)
    if not train_dir.is_dir() or test_dir is None:
        raise DataError(f"{root}: expected subfolders train/ and val/ (or test/)")
    classes = sorted(d.name for d in train_dir.iterdir() if d.is_dir())
    if len(classes) < 2:
        raise DataError(f"{train_dir}: found {len(classes)} class folders, need at least 2")
    return train_dir, test_dir, classes


@dataclass
class FolderSplit:
    """An image folder's split left on disk (data.stream): its files, labels and source rows, in the order an
    in-memory read holds them; each image decoded on demand, exactly as :func:`folder_image` reads it (a map-style
    dataset for torch's DataLoader), and refused if its file changed since it was listed."""
    paths: np.ndarray
    """The files' paths, a numpy array of bytes (``os.fsencode``): no Python object per file, so DataLoader workers
    reading it do not copy its pages (reference counts) one by one into each process."""
    labels: torch.Tensor
    index: torch.Tensor
    size: int
    stamps: np.ndarray
    """Each file's (size in bytes, modification time in ns) when it was listed: int64, N x 2."""

    def __len__(self) -> int:
        return len(self.paths)

    def path(self, i: int) -> Path:
        return Path(os.fsdecode(self.paths[i]))

    def __getitem__(self, i: int) -> torch.Tensor:
        path = self.path(i)
        if _stamp(path, " any more") != tuple(self.stamps[i].tolist()):
            raise DataError(f"{path}: the file changed after pst-dist listed the folder (size or modification "
                            f"time); the run must not mix two versions of its data: start it again")
        return folder_image(path, self.size)

    def take(self, rows: torch.Tensor) -> FolderSplit:
        r = rows.numpy()
        return FolderSplit(self.paths[r], self.labels[rows], self.index[rows], self.size, self.stamps[r])

    def decode(self, n: int | None = None, workers: int = 0) -> Split:
        """The first ``n`` images (all with None) decoded into one tensor, by ``workers`` decoding processes
        (data.loader_workers; 0: in this process) when there are more than a few hundred: an ImageNet-sized folder
        takes minutes on one core."""
        k = len(self) if n is None else min(n, len(self))
        out = torch.empty(k, *self.shape[1:], dtype=torch.uint8)
        start = 0
        if workers and k > DECODE_BATCH:
            batches = [list(range(i, min(k, i + DECODE_BATCH))) for i in range(0, k, DECODE_BATCH)]
            try:
                for rows, (x, errors) in zip(batches, decoded(self, batches, workers), strict=True):
                    raise_first(errors)
                    out[rows[0]: rows[-1] + 1] = x
                    start = rows[-1] + 1
            except RuntimeError as e:  # no processes or shared memory to be had (a container's 64 MB /dev/shm)
                print(f"[data] decoding processes failed ({' '.join(str(e).split())[:200]}); decoding the other "
                      f"{k - start} images in this process", file=sys.stderr)
        for i in range(start, k):
            out[i] = self[i]
        return Split(out, self.labels[:k], self.index[:k])

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return len(self), 3, self.size, self.size

    def decoded_bytes(self) -> int:
        return math.prod(self.shape)


@dataclass
class FolderListing:
    """An imagefolder source listed, not decoded: its training and test splits in the source's own order, and the
    rows :func:`carve` gives each split."""
    train: FolderSplit
    test: FolderSplit
    num_classes: int
    rows: Rows

    def part(self, name: str) -> FolderSplit:
        """The ``train``, ``val`` or ``test`` split's files, carved."""
        source = self.test if name == "test" or (name == "val" and self.rows.val_from == "test") else self.train
        return source.take(getattr(self.rows, name))

    def fingerprint(self) -> dict:
        """What a resume compares to know the folder is the one its run started on (meta.json's ``inputs.folder``):
        ``sha256`` of every file's path, label, size and modification time, both splits in the source's order;
        ``sizes_sha256`` of the same without the modification times (a copy that did not keep them); ``files``."""
        full, sizes = hashlib.sha256(), hashlib.sha256()
        for split in (self.train, self.test):
            for part in (len(split).to_bytes(8, "little"), split.paths.dtype.str.encode(), split.paths.tobytes(),
                         split.labels.numpy().astype("<i8").tobytes(), split.stamps[:, 0].astype("<i8").tobytes()):
                full.update(part)
                sizes.update(part)
            full.update(split.stamps[:, 1].astype("<i8").tobytes())
        files = len(self.train) + len(self.test)
        return {"sha256": full.hexdigest(), "sizes_sha256": sizes.hexdigest(), "files": files}


def _stamp(path: Path, when: str = "") -> tuple[int, int]:
    """(size, modification time in ns) of ``path``; DataError naming it when it cannot be read (``when``)."""
    try:
        st = path.stat()
    except OSError as e:
        raise DataError(f"{path}: cannot read it{when} ({type(e).__name__}: {one_line(e)})") from None
    return st.st_size, st.st_mtime_ns


def decoded(files, batches: list[list[int]], workers: int, ahead: int = 2):
    """(uint8 images, decode errors) of each list of rows in ``batches``, decoded by ``workers`` DataLoader
    processes, in order. A file that cannot be read is an error message rather than an exception in a worker (the
    batch's images then an empty tensor), so that it reaches the caller as the message alone."""
    from torch.utils.data import DataLoader  # start-up time: only an image folder's decoding needs it

    # its own generator: a DataLoader draws its workers' base seed from the global one, which training owns
    return iter(DataLoader(_Decoding(files), batch_sampler=batches, num_workers=workers, collate_fn=_collate,
                           prefetch_factor=ahead if workers else None,
                           worker_init_fn=_one_thread, generator=torch.Generator()))


class _Decoding:
    def __init__(self, files) -> None:
        self.files = files

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor | None, str]:
        try:
            return self.files[i], ""
        except DataError as e:
            return None, str(e)


def _collate(items: list[tuple[torch.Tensor | None, str]]) -> tuple[torch.Tensor, list[str]]:
    errors = [e for _, e in items if e]
    if errors:
        return torch.empty(0, dtype=torch.uint8), errors
    return torch.stack([x for x, _ in items]), []


def raise_first(errors: list[str]) -> None:
    if errors:
        more = f" (and {len(errors) - 1} more file(s) in this batch)" if len(errors) > 1 else ""
        raise DataError(errors[0] + more)


def _one_thread(_worker: int) -> None:
    torch.set_num_threads(1)  # a decoding process: one intra-op thread each, the training process keeps the cores


DECODE_BATCH = 256
"""Images per batch a decoding process hands back when a folder is read into memory."""


def list_folder(cfg: DataConfig) -> FolderListing:
    """List ``cfg``'s image folder (a stat per file: sizes and modification times are recorded) and carve it."""
    check_val_size(cfg)
    train_dir, test_dir, classes = folder_layout(cfg)
    splits = []
    for d in (train_dir, test_dir):
        paths, labels = folder_files(d, classes, train_dir)
        stamps = np.array([_stamp(p) for p in paths], dtype=np.int64)
        names = np.array([os.fsencode(p) for p in paths])
        splits.append(FolderSplit(names, labels, torch.arange(len(paths)), cfg.img_size, stamps.reshape(-1, 2)))
    rows = carve(cfg, len(splits[0]), len(splits[1]))
    return FolderListing(splits[0], splits[1], len(classes), rows)


def load_streamed_splits(cfg: DataConfig, head: int | None, listing: FolderListing | None = None,
                         decode: tuple[str, ...] = ("val", "test")) -> tuple[Splits, FolderSplit]:
    """An imagefolder source with its training split left on disk (data.stream): the splits in ``decode``
    decoded into memory (the others empty), the training split as a :class:`FolderSplit` with the rows, order and
    carving :func:`load_splits` gives (:func:`carve`), and its first ``head`` images decoded (``Splits.train``:
    the detectors' probe; None: all of them, the in-memory read)."""
    listing = listing or list_folder(cfg)
    stream = listing.part("train")
    workers = cfg.loader_workers
    val, test = (listing.part(k).decode(None if k in decode else 0, workers) for k in ("val", "test"))
    splits = Splits(stream.decode(head, workers), val, test, listing.num_classes, cfg.source, len(listing.train))
    return splits, stream
