"""Data sources: each returns clean train / validation / test splits as uint8 N x C x H x W tensors.

Validation is disjoint from test. Files are read defensively: a corrupt file is a clear DataError.
"""

from __future__ import annotations

import gzip
import io
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..config import DataConfig


class DataError(ValueError):
    """A data set is missing or malformed; the message names the file."""


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


def load_splits(cfg: DataConfig) -> Splits:
    """Load ``cfg.source`` and carve the clean validation split (from train or test, never overlapping test)."""
    if cfg.source == "beton":
        raise DataError("data.source='beton' is read by pst_dist.data.beton (build_data), not load_splits")
    loader = {"synthetic": _synthetic, "fashion-mnist": _fashion_mnist, "cifar10": _cifar, "cifar100": _cifar,
              "imagefolder": _imagefolder}[cfg.source]
    train, test, num_classes = loader(cfg)
    source_train_size = len(train)
    g = torch.Generator().manual_seed(cfg.seed)
    train = train.subset(torch.randperm(len(train), generator=g))
    if cfg.val_from == "train":
        if cfg.val_size >= len(train):
            raise DataError(f"data.val_size={cfg.val_size} leaves no training images (train has {len(train)})")
        val, train = train.subset(torch.arange(cfg.val_size)), train.subset(torch.arange(cfg.val_size, len(train)))
    else:
        test = test.subset(torch.randperm(len(test), generator=g))
        if cfg.val_size >= len(test):
            raise DataError(f"data.val_size={cfg.val_size} leaves no test images (test has {len(test)})")
        val, test = test.subset(torch.arange(cfg.val_size)), test.subset(torch.arange(cfg.val_size, len(test)))
    if cfg.train_size:
        train = train.subset(torch.arange(min(cfg.train_size, len(train))))
    if cfg.test_size:
        test = test.subset(torch.arange(min(cfg.test_size, len(test))))
    return Splits(train, val, test, num_classes, cfg.source, source_train_size)


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
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise DataError(f"{path}: cannot read IDX file ({e})") from None
    if len(raw) < 4:
        raise DataError(f"{path}: too short for an IDX header ({len(raw)} bytes)")
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code != 0x08 or not 1 <= ndim <= 4:
        raise DataError(f"{path}: not a uint8 IDX file (magic {raw[:4].hex()})")
    if len(raw) < 4 + 4 * ndim:
        raise DataError(f"{path}: truncated IDX header")
    dims = struct.unpack(f">{ndim}I", raw[4: 4 + 4 * ndim])
    expected = 4 + 4 * ndim + int(np.prod(dims))
    if len(raw) != expected:
        raise DataError(f"{path}: IDX header says dims {dims} ({expected} bytes) but the file has {len(raw)} bytes")
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _find(root: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz"):
        if (root / name).is_file():
            return root / name
    raise DataError(f"missing data file {root / stem}[.gz]")


def _fashion_mnist(cfg: DataConfig) -> tuple[Split, Split, int]:
    root = Path(cfg.root or FMNIST_DEFAULT)
    if not root.is_dir():
        raise DataError(f"Fashion-MNIST directory not found: {root} (apt-get install dataset-fashion-mnist, or set "
                        f"data.root)")
    out = []
    for prefix in ("train", "t10k"):
        x = read_idx(_find(root, f"{prefix}-images-idx3-ubyte"))
        y = read_idx(_find(root, f"{prefix}-labels-idx1-ubyte"))
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise DataError(f"{root}: {prefix} images {x.shape} and labels {y.shape} do not match")
        if y.max() >= 10:
            raise DataError(f"{root}: {prefix} labels contain {int(y.max())}, expected 0..9")
        out.append(Split(torch.from_numpy(x.copy())[:, None], torch.from_numpy(y.astype(np.int64))))
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
            d = _RestrictedUnpickler(io.BytesIO(f.read()), encoding="bytes").load()
    except FileNotFoundError:
        raise DataError(f"missing CIFAR batch file {path}") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as e:
        raise DataError(f"{path}: not a valid CIFAR batch ({e})") from None
    if not isinstance(d, dict):
        raise DataError(f"{path}: not a valid CIFAR batch (top level is {type(d).__name__})")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in d.items()}


def _cifar_split(files: list[Path], label_key: str) -> Split:
    xs, ys = [], []
    for p in files:
        d = load_cifar_batch(p)
        if "data" not in d or label_key not in d:
            raise DataError(f"{p}: CIFAR batch lacks 'data' or {label_key!r} (keys: {sorted(d)})")
        x = np.asarray(d["data"], dtype=np.uint8)
        y = np.asarray(d[label_key], dtype=np.int64)
        if x.ndim != 2 or x.shape[1] != 3072 or len(x) != len(y):
            raise DataError(f"{p}: data has shape {x.shape} for {len(y)} labels, expected N x 3072")
        xs.append(x.reshape(-1, 3, 32, 32))
        ys.append(y)
    return Split(torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys)))


def _cifar(cfg: DataConfig) -> tuple[Split, Split, int]:
    ten = cfg.source == "cifar10"
    sub = "cifar-10-batches-py" if ten else "cifar-100-python"
    root = Path(cfg.root or f"data/{cfg.source}")
    base = root / sub if (root / sub).is_dir() else root
    if not base.is_dir():
        _try_download(cfg.source, root)
        base = root / sub
    if ten:
        train = _cifar_split([base / f"data_batch_{i}" for i in range(1, 6)], "labels")
        test = _cifar_split([base / "test_batch"], "labels")
    else:
        train = _cifar_split([base / "train"], "fine_labels")
        test = _cifar_split([base / "test"], "fine_labels")
    n = 10 if ten else 100
    for name, s in (("train", train), ("test", test)):
        if int(s.labels.max()) >= n or int(s.labels.min()) < 0:
            raise DataError(f"{base}: {name} labels outside 0..{n - 1}")
    return train, test, n


def _try_download(source: str, root: Path) -> None:
    """Download the CIFAR archive with torchvision when the machine is online; a clear error otherwise."""
    from torchvision.datasets import CIFAR10, CIFAR100

    cls = CIFAR10 if source == "cifar10" else CIFAR100
    try:
        from torchvision.datasets.utils import download_and_extract_archive

        download_and_extract_archive(cls.url, str(root), filename=cls.filename, md5=cls.tgz_md5)
    except Exception as e:  # noqa: BLE001 - any network failure means the same thing here
        raise DataError(f"{source} not found under {root} and could not be downloaded ({type(e).__name__}: {e}); "
                        f"put the python batch directory there or set data.root") from None


# ---------------------------------------------------------------------------------------------------------------
# ImageFolder (ImageNet-mini): root/train/<class>/*, root/val/<class>/* (used as the test split)

IMG_EXT = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff", ".JPEG"}


def _read_folder(root: Path, classes: list[str], size: int) -> Split:
    from PIL import Image, UnidentifiedImageError
    from torchvision.transforms import functional as F

    xs, ys = [], []
    for ci, cname in enumerate(classes):
        cdir = root / cname
        if not cdir.is_dir():
            raise DataError(f"{root}: class folder {cname!r} missing (present in train)")
        for p in sorted(cdir.iterdir()):
            if p.suffix.lower() not in {e.lower() for e in IMG_EXT}:
                continue
            try:
                with Image.open(p) as im:
                    im = im.convert("RGB")
                    im = F.center_crop(F.resize(im, size), [size, size])
                    xs.append(torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1))
            except (UnidentifiedImageError, OSError) as e:
                raise DataError(f"{p}: cannot decode image ({e})") from None
            ys.append(ci)
    if not xs:
        raise DataError(f"{root}: no images found")
    return Split(torch.stack(xs), torch.tensor(ys, dtype=torch.int64))


def _imagefolder(cfg: DataConfig) -> tuple[Split, Split, int]:
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
    return _read_folder(train_dir, classes, cfg.img_size), _read_folder(test_dir, classes, cfg.img_size), len(classes)
