"""FFCV ``.beton`` files: lossless poisoned data sets on disk, validated on open, and a sharded FFCV loader.

A beton directory holds ``train.beton`` (poisoned), ``val.beton`` and ``test.beton`` (clean) and ``beton.json``
(what was written: source, poison and its measured norms, the data set fingerprint, normalisation statistics,
each file's size and SHA-256). Images are stored ``raw`` (exact uint8) unless ``jpg`` is asked for explicitly:
JPEG is itself a defense against unlearnable examples and would contaminate every result.

Grayscale images are stored as three equal channels (FFCV's image field is RGB) and read back as one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from ..config import Config
from .sources import DataError, Split, Splits

SPLITS = ("train", "val", "test")
META = "beton.json"
FORMAT = "pst-dist-beton/1"
JPEG_WARNING = ("WARNING: write_mode='jpg' stores JPEG-compressed images (quality {q}). JPEG compression is itself "
                "a defense against unlearnable examples (ISS), so every result on these files measures poison + "
                "JPEG, not the poison. Use the default raw mode for attack and defense measurements.")


def _need_ffcv():
    try:
        import ffcv  # noqa: F401
    except ImportError as e:  # pragma: no cover - the Makefile installs it
        raise DataError(f".beton files need ffcv ({e}); `make` installs it with its system libraries") from e


# ---------------------------------------------------------------------------------------------------------------
# writing


class _Rows:
    """FFCV writer dataset over a uint8 N x C x H x W tensor: (H x W x 3 uint8, label)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.x, self.y = images.numpy(), labels.numpy()

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        img = self.x[i].transpose(1, 2, 0)
        if img.shape[2] == 1:
            img = np.repeat(img, 3, axis=2)
        return np.ascontiguousarray(img), int(self.y[i])


def write_split(path: Path, images: torch.Tensor, labels: torch.Tensor, *, write_mode: str = "raw",
                jpeg_quality: int = 90, num_workers: int = 2) -> None:
    """One split to one .beton at ``path`` (written in place: callers write into a temporary directory)."""
    _need_ffcv()
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    if write_mode not in ("raw", "jpg"):
        raise ValueError(f"write_mode={write_mode!r}: expected 'raw' or 'jpg'")
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
        raise DataError(f"{path.name}: expected uint8 N x (1|3) x H x W images, found {images.dtype} "
                        f"{tuple(images.shape)}")
    field = RGBImageField(write_mode=write_mode, jpeg_quality=jpeg_quality)
    sample_bytes = images.shape[2] * images.shape[3] * 3 + 4096
    page_size = max(1 << 21, 1 << (sample_bytes - 1).bit_length())  # FFCV: a power of 2, >= 2 MiB, >= a sample
    workers = max(1, min(num_workers, -(-len(labels) // 256)))  # each writer process fills pages of its own
    writer = DatasetWriter(str(path), {"image": field, "label": IntField()}, page_size=page_size, num_workers=workers)
    writer.from_indexed_dataset(_Rows(images, labels), chunksize=256)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def fingerprint(split: Split) -> str:
    """SHA-256 of a split's clean images and labels: names the data set a poison was made for."""
    h = hashlib.sha256()
    h.update(str(tuple(split.images.shape)).encode())
    h.update(split.images.contiguous().numpy().tobytes())
    h.update(split.labels.numpy().tobytes())
    return h.hexdigest()


def write_betons(cfg: Config, out: Path, *, write_mode: str = "raw", jpeg_quality: int = 90,
                 num_workers: int = 2, log=print) -> dict:
    """Build the configured data set and poison, write train/val/test .beton files and beton.json into ``out``.

    Atomic: everything goes to a sibling ``.<name>.partial-<pid>`` directory that is renamed into place only when
    complete, so an interrupted write leaves nothing that looks like a beton directory.
    """
    from ..poison import norms
    from ..train import build_data

    if cfg.data.source == "beton":
        raise DataError("data.source='beton': the input is already a beton directory; pick the original source")
    if write_mode == "jpg":
        log(JPEG_WARNING.format(q=jpeg_quality))
    t0 = time.perf_counter()
    data = build_data(cfg)  # validates every input before anything is written
    s = data.splits
    tensors = {"train": (data.poisoned_train, s.train.labels), "val": (s.val.images, s.val.labels),
               "test": (s.test.images, s.test.labels)}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        files = {}
        for name, (x, y) in tensors.items():
            t = time.perf_counter()
            write_split(tmp / f"{name}.beton", x, y, write_mode=write_mode, jpeg_quality=jpeg_quality,
                        num_workers=num_workers)
            p = tmp / f"{name}.beton"
            files[name] = {"file": p.name, "num_samples": len(y), "bytes": p.stat().st_size, "sha256": sha256(p)}
            log(f"wrote {name}.beton: {len(y)} images, {p.stat().st_size / 2**20:.1f} MiB, "
                f"{time.perf_counter() - t:.1f} s")
        meta = {
            "format": FORMAT, "write_mode": write_mode, "jpeg_quality": jpeg_quality if write_mode == "jpg" else None,
            "lossy": write_mode == "jpg", "source": cfg.data.source, "shape": list(s.shape),
            "num_classes": s.num_classes, "splits": files,
            "poison": {**asdict(cfg.poison), "norms": norms(s.train.images, data.poisoned_train)},
            "fingerprint": {"clean_train_sha256": fingerprint(s.train)},
            "mean": data.mean.tolist(), "std": data.std.tolist(),
            "data_config": asdict(cfg.data), "written_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "seconds": round(time.perf_counter() - t0, 2),
        }
        (tmp / META).write_text(json.dumps(meta, indent=2))
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        if out.exists():
            os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta


# ---------------------------------------------------------------------------------------------------------------
# reading


def check_beton(path: Path, expect_samples: int | None = None, expect_bytes: int | None = None) -> int:
    """Validate a .beton before FFCV maps it: header, fields (image, label), allocation table inside the file.

    Returns the number of samples. Raises DataError naming the file and what is wrong.
    """
    _need_ffcv()
    from ffcv.fields import IntField, RGBImageField
    from ffcv.reader import Reader

    if not path.is_file():
        raise DataError(f"missing split file: {path}")
    size = path.stat().st_size
    if expect_bytes is not None and size != expect_bytes:
        raise DataError(f"{path}: {size} bytes, beton.json says {expect_bytes}: truncated or replaced")
    try:
        r = Reader(str(path))
    except Exception as e:  # noqa: BLE001 - FFCV raises assorted errors on foreign bytes
        raise DataError(f"{path}: not a readable FFCV .beton ({type(e).__name__}: {e})") from e
    found = {n: type(h).__name__ for n, h in r.handlers.items()}
    if set(found) != {"image", "label"} or not isinstance(r.handlers["image"], RGBImageField) \
            or not isinstance(r.handlers["label"], IntField):
        raise DataError(f"{path}: foreign .beton: expected fields image (RGBImageField) and label (IntField), "
                        f"found {found}")
    n = int(r.num_samples)
    if expect_samples is not None and n != expect_samples:
        raise DataError(f"{path}: {n} samples, beton.json says {expect_samples}")
    table = r.alloc_table
    if len(table) < n or len(np.unique(table["sample_id"])) < n:
        raise DataError(f"{path}: allocation table covers {len(np.unique(table['sample_id']))} of {n} samples: "
                        f"truncated")
    end = int((table["ptr"] + table["size"]).max()) if len(table) else 0
    if end > size:
        raise DataError(f"{path}: data runs to byte {end} but the file has {size}: truncated")
    return n


class BetonDir:
    """A directory written by :func:`write_betons`, validated on open."""

    def __init__(self, root: Path | str):
        _need_ffcv()
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f"beton directory not found: {self.root} (write one with `pst-dist write-beton`)")
        mp = self.root / META
        if not mp.is_file():
            raise DataError(f"{self.root}: no {META}; not a directory written by `pst-dist write-beton`")
        try:
            self.meta = json.loads(mp.read_text())
        except json.JSONDecodeError as e:
            raise DataError(f"{mp}: not valid JSON ({e})") from e
        if self.meta.get("format") != FORMAT:
            raise DataError(f"{mp}: format {self.meta.get('format')!r}, expected {FORMAT!r}")
        for name in SPLITS:
            info = self.meta["splits"].get(name)
            if info is None:
                raise DataError(f"{mp}: no entry for split {name!r}")
            check_beton(self.file(name), info["num_samples"], info["bytes"])
        self.channels = int(self.meta["shape"][0])

    def file(self, split: str) -> Path:
        return self.root / f"{split}.beton"

    def __len__(self) -> int:
        return self.meta["splits"]["train"]["num_samples"]

    def batches(self, split: str, batch_size: int, **kw) -> BetonBatches:
        """An FFCV loader over one split (keyword arguments: see :class:`BetonBatches`)."""
        return BetonBatches(self.file(split), self.meta["shape"], batch_size, **kw)

    def read_split(self, split: str, limit: int | None = None, num_workers: int = 2) -> Split:
        """Decode (the first ``limit`` images of) a split into memory, in file order, without augmentation."""
        images, labels = [], []
        n = 0
        for x, y in self.batches(split, 512, shuffle=False, augment="none", drop_last=False,
                                 num_workers=num_workers):
            images.append(x.clone())  # FFCV reuses its output buffers
            labels.append(y.clone())
            n += len(y)
            if limit is not None and n >= limit:
                break
        x, y = torch.cat(images), torch.cat(labels)
        return Split(x[:limit].contiguous(), y[:limit].contiguous())


def beton_data(cfg: Config):
    """``train.Data`` for data.source='beton': clean val/test in memory, the training split left on disk (its
    first images kept for the detectors' probe and the sample grid)."""
    from ..train import Data

    if cfg.poison.kind != "none":
        raise DataError(f"data.source='beton' already holds its poison; set poison.kind='none' "
                        f"(found poison.kind={cfg.poison.kind!r})")
    b = BetonDir(cfg.data.root)
    if b.meta["lossy"]:
        print(JPEG_WARNING.format(q=b.meta["jpeg_quality"]), file=sys.stderr)
    workers = cfg.data.loader_workers
    head = b.read_split("train", limit=max(cfg.data.probe_size, 64), num_workers=workers)
    splits = Splits(head, b.read_split("val", num_workers=workers), b.read_split("test", num_workers=workers),
                    int(b.meta["num_classes"]), f"beton:{b.meta['source']}", len(b))
    return Data(splits, head.images, torch.tensor(b.meta["mean"]), torch.tensor(b.meta["std"]), beton=b)


# ---------------------------------------------------------------------------------------------------------------
# loading


def _sharded_order_cls():
    from ffcv.traversal_order.base import TraversalOrder

    class ShardedOrder(TraversalOrder):
        """The trainer's own order: one permutation from (seed, epoch) shared by all ranks, rank r taking positions
        r, r + W, ... of its first (n // W) * W entries. Disjoint shards, no padding duplicates (FFCV's built-in
        distributed order pads with repeats like DistributedSampler), and the same sample order as the torch
        path for the same seed."""

        def __init__(self, loader=None, *, shuffle: bool = True, rank: int = 0, world_size: int = 1,
                     seed: int = 0):
            self.shuffle, self.rank, self.world_size, self.order_seed = shuffle, rank, world_size, seed
            if loader is not None:
                super().__init__(loader)

        def __call__(self, loader):  # ffcv 1.0.2 instantiates a custom order by calling it with the loader
            return ShardedOrder(loader, shuffle=self.shuffle, rank=self.rank, world_size=self.world_size,
                                seed=self.order_seed)

        def sample_order(self, epoch: int):
            n = len(self.indices)
            if self.shuffle:
                g = torch.Generator().manual_seed(self.order_seed * 100_003 + epoch)
                perm = torch.randperm(n, generator=g).numpy()
            else:
                perm = np.arange(n)
            per_rank = n // self.world_size
            return self.indices[perm[self.rank: per_rank * self.world_size: self.world_size]]

    return ShardedOrder


class BetonBatches:
    """Batches of (uint8 N x C x H x W images, int64 labels) from a validated .beton of images of ``shape``
    (C, H, W), e.g. one split of a :class:`BetonDir` (``BetonDir.batches``), decoded and
    augmented by FFCV (pad-crop via RandomTranslate, flip, or random resized crop), sharded per rank, moved to
    ``device`` inside the pipeline (non-blocking). Batches are FFCV's reused buffers: clone what you keep.

    Order is a function of (seed, epoch) and matches ``TensorBatches``; FFCV's augmentations draw from numba's
    own random state, so augmentation (not order) differs between runs.
    """

    def __init__(self, path: Path | str, shape, batch_size: int, *, shuffle: bool = True, augment: str = "none",
                 seed: int = 0, drop_last: bool = True, rank: int = 0, world_size: int = 1,
                 device: torch.device | str = "cpu", num_workers: int = 2):
        from ffcv.fields.decoders import IntDecoder, RandomResizedCropRGBImageDecoder, SimpleRGBImageDecoder
        from ffcv.loader import Loader
        from ffcv.transforms import RandomHorizontalFlip, RandomTranslate, Squeeze, ToDevice, ToTensor, ToTorchImage

        from .loaders import RRC_RATIO, RRC_SCALE

        c, h, w = shape
        if augment not in ("none", "crop", "crop_flip", "rrc_flip"):
            from ..config import ConfigError

            raise ConfigError(f"data.augment={augment!r} has no FFCV pipeline: use data.loader='torch' for it")
        self.channels = c
        device = torch.device(device)
        if augment == "rrc_flip":
            image = [RandomResizedCropRGBImageDecoder((h, w), scale=RRC_SCALE, ratio=RRC_RATIO)]
        else:
            image = [SimpleRGBImageDecoder()]
            if augment in ("crop", "crop_flip"):
                image.append(RandomTranslate(padding=max(1, h // 8)))
        if augment in ("crop_flip", "rrc_flip"):
            image.append(RandomHorizontalFlip())
        label = [IntDecoder(), ToTensor(), Squeeze()]
        image.append(ToTensor())
        if device.type == "cuda":
            image.append(ToDevice(device, non_blocking=True))
            label.append(ToDevice(device, non_blocking=True))
        image.append(ToTorchImage(channels_last=False))
        order = _sharded_order_cls()(shuffle=shuffle, rank=rank, world_size=world_size, seed=seed)
        self.loader = Loader(str(path), batch_size=batch_size, num_workers=num_workers, order=order,
                             distributed=world_size > 1, seed=seed, drop_last=drop_last,
                             pipelines={"image": image, "label": label})

    def set_epoch(self, epoch: int) -> None:
        self.loader.next_epoch = epoch

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for x, y in self.loader:
            yield (x[:, :1] if self.channels == 1 else x), y.long()
