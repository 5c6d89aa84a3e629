"""FFCV ``.beton`` files: lossless poisoned data sets on disk, validated on open, and a sharded FFCV loader.

A beton directory holds ``train.beton`` (poisoned), ``val.beton`` and ``test.beton`` (clean) and ``beton.json``
(what was written: source, poison and its measured norms, the data set fingerprint, normalisation statistics,
each file's size and SHA-256, checked when the directory is opened: about 1 s per GB, skipped with
``--data.verify=false``). Images are stored ``raw`` (exact uint8) unless ``jpg`` is asked for explicitly:
JPEG is itself a defense against unlearnable examples and would contaminate every result.

Grayscale images are stored as three equal channels (FFCV's image field is RGB) and read back as one.
"""

from __future__ import annotations

import ctypes
import functools
import math
import os
import queue
from multiprocessing import Process, Queue, Value
from pathlib import Path

import numpy as np
import torch

from ..config import ConfigError
from ..io import OutputError, die_with_parent, read_json, sha256
from .loaders import RRC_RATIO, RRC_SCALE, shard_order
from .sources import DataError, FolderSplit, Split

SPLITS = ("train", "val", "test")
META = "beton.json"
OWNED = (*(f"{k}.beton" for k in SPLITS), META)  # everything write-beton writes into --out: nothing else is replaced
FORMAT = "pst-dist-beton/1"
JPEG_WARNING = ("WARNING: write_mode='jpg' stores JPEG-compressed images (quality {q}). JPEG compression is itself "
                "a defense against unlearnable examples (ISS), so every result on these files measures poison + "
                "JPEG, not the poison. Use the default raw mode for attack and defense measurements.")


def _need_ffcv():
    try:
        import ffcv  # noqa: F401 - ffcv: optional (its system libraries), imported only to say so when missing
    except ImportError as e:  # pragma: no cover - the Makefile installs it
        raise DataError(f".beton files need ffcv ({e}); `make` installs it with its system libraries") from e


# ---------------------------------------------------------------------------------------------------------------
# writing


class _Rows:
    """FFCV writer dataset over uint8 N x C x H x W images (a tensor, or a streamed image folder's split, each file
    decoded when its row is written): (H x W x 3 uint8, label)."""

    def __init__(self, images: torch.Tensor | FolderSplit, labels: torch.Tensor):
        self.x, self.y = images.numpy() if isinstance(images, torch.Tensor) else images, labels.numpy()

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        img = np.asarray(self.x[i]).transpose(1, 2, 0)
        if img.shape[2] == 1:
            img = np.repeat(img, 3, axis=2)
        return np.ascontiguousarray(img), int(self.y[i])


def _ffcv_worker(work_fn, parent: int, failures, *args) -> None:
    """Run one FFCV writer worker; on any failure (a full disk: EFBIG, ENOSPC) report it to the parent and exit
    quietly: the parent raises it as one error, instead of a worker traceback and a parent that waits forever. It
    ends with the parent (killed, say), instead of blocking forever on the parent's queues."""
    die_with_parent(parent)
    try:
        work_fn(*args)
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which raises it
        failures.put((getattr(e, "errno", None), f"{type(e).__name__}: {e}"))
        failures.close()
        failures.join_thread()
        os._exit(1)


@functools.cache
def _safe_writer_cls():
    """FFCV 1.0.2's DatasetWriter with a parent loop that notices a failed worker. FFCV's own loop polls a sample
    counter until every sample is written, so one worker dying (a full disk) hangs ``write-beton`` forever, and the
    other workers spin waiting for the dead one's page."""

    # optional heavy dependency (FFCV), imported only for .beton files
    from ffcv.memory_allocator import MemoryAllocator
    from ffcv.writer import DatasetWriter  # optional heavy dependency (FFCV), imported only for .beton files

    class SafeWriter(DatasetWriter):
        def _write_common(self, num_samples, queue_content, work_fn, extra_worker_args) -> None:
            self.num_samples = num_samples
            self.prepare()  # writes the header, creates the shared metadata block
            work, allocations, failures = Queue(), Queue(), Queue()
            for todo in queue_content:
                work.put(todo)
            for _ in range(self.num_workers):
                work.put(None)  # one stop token per worker
            done = Value(ctypes.c_uint64, 0)
            allocator = MemoryAllocator(self.fname, self.data_region_start, self.page_size)
            args = (work, self.metadata_sm, self.metadata_type, self.fields, allocator, done, allocations,
                    *extra_worker_args)
            procs = [Process(target=_ffcv_worker, args=(work_fn, os.getpid(), failures, *args))
                     for _ in range(self.num_workers)]
            try:
                for p in procs:
                    p.start()
                table = []
                while len(table) < len(procs):  # each worker sends its allocations once, when it is done
                    try:
                        table.append(allocations.get(timeout=0.2))
                    except queue.Empty:
                        dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
                        if dead:
                            self._failed(failures, dead[0])
                self.finalize([a for t in table for a in t])
            except BaseException:
                work.cancel_join_thread()  # unread chunks must not block this process's exit
                raise
            finally:
                for p in procs:
                    if p.is_alive():
                        p.terminate()
                    p.join()
                self.metadata_sm.close()
                self.metadata_sm.unlink()

        def _failed(self, failures, exitcode: int) -> None:
            try:
                code, what = failures.get(timeout=5)
            except queue.Empty:  # killed before it could say why (out of memory: exit code -9)
                code, what = None, f"exit code {exitcode}"
            raise OSError(code, os.strerror(code) if code else f"an FFCV writer process stopped ({what})", self.fname)

    return SafeWriter


def write_split(path: Path, images: torch.Tensor | FolderSplit, labels: torch.Tensor, *, write_mode: str = "raw",
                jpeg_quality: int = 90, num_workers: int = 2) -> None:
    """One split to one .beton at ``path`` (written in place: callers write into a temporary directory). ``images``:
    uint8 N x C x H x W, or a streamed image folder's split, its files decoded by the writer's processes."""
    _need_ffcv()
    from ffcv.fields import IntField, RGBImageField  # optional heavy dependency (FFCV), imported only for .beton files

    if write_mode not in ("raw", "jpg"):
        raise ValueError(f"write_mode={write_mode!r}: expected 'raw' or 'jpg'")
    if isinstance(images, torch.Tensor) and (images.dtype != torch.uint8 or images.ndim != 4
                                             or images.shape[1] not in (1, 3)):
        raise DataError(f"{path.name}: expected uint8 N x (1|3) x H x W images, found {images.dtype} "
                        f"{tuple(images.shape)}")
    field = RGBImageField(write_mode=write_mode, jpeg_quality=jpeg_quality)
    sample_bytes = images.shape[2] * images.shape[3] * 3 + 4096
    page_size = max(1 << 21, 1 << (sample_bytes - 1).bit_length())  # FFCV: a power of 2, >= 2 MiB, >= a sample
    workers = max(1, min(num_workers, -(-len(labels) // 256)))  # each writer process fills pages of its own
    writer = _safe_writer_cls()(str(path), {"image": field, "label": IntField()}, page_size=page_size,
                                num_workers=workers)
    writer.from_indexed_dataset(_Rows(images, labels), chunksize=256)


def is_beton_dir(out: Path) -> bool:
    """Is ``out`` an earlier write-beton output (its beton.json names our format)?"""
    try:
        return read_json(out / META, META).get("format") == FORMAT
    except OutputError:
        return False


# ---------------------------------------------------------------------------------------------------------------
# reading


def check_beton(path: Path, expect_samples: int | None = None, expect_bytes: int | None = None,
                expect_hw: tuple[int, int] | None = None, num_classes: int | None = None) -> int:
    """Validate a .beton before FFCV maps it: header, fields (image, label), allocation table inside the file; with
    ``expect_hw`` / ``num_classes``, every sample's image size and label as its per-sample metadata records them.

    Returns the number of samples. Raises DataError naming the file and what is wrong.
    """
    _need_ffcv()
    from ffcv.fields import IntField, RGBImageField  # optional heavy dependency (FFCV), imported only for .beton files
    from ffcv.reader import Reader  # optional heavy dependency (FFCV), imported only for .beton files

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
    names = list(r.handlers)  # the metadata's fields f0, f1 are the handlers' in order
    image, label = (r.metadata[f"f{names.index(k)}"] for k in ("image", "label"))
    if expect_hw is not None and n:
        odd = np.flatnonzero((image["height"] != expect_hw[0]) | (image["width"] != expect_hw[1]))
        if len(odd):
            i = int(odd[0])
            raise DataError(f"{path}: sample {i} is {int(image['height'][i])} x {int(image['width'][i])} pixels, "
                            f"{META} says {expect_hw[0]} x {expect_hw[1]} ({len(odd)} samples differ)")
    if num_classes is not None and n:
        lo, hi = int(label.min()), int(label.max())
        if lo < 0 or hi >= num_classes:
            raise DataError(f"{path}: labels span {lo}..{hi}, {META} says {num_classes} classes "
                            f"(0..{num_classes - 1})")
    return n


def _bad(mp: Path, key: str, value: object, want: str) -> DataError:
    shown = repr(value) if len(repr(value)) <= 80 else repr(value)[:77] + "..."
    return DataError(f"{mp}: key {key!r} = {shown}: expected {want}")


def _is_int(v: object) -> bool:
    return type(v) is int  # not bool, not float


def check_meta(meta: dict, mp: Path) -> None:
    """Validate what :class:`BetonDir` and the trainer read from beton.json: DataError naming the key and value."""
    if meta.get("format") != FORMAT:
        raise _bad(mp, "format", meta.get("format"), repr(FORMAT))
    shape = meta.get("shape")
    if not isinstance(shape, list) or len(shape) != 3 or not all(_is_int(v) and v >= 1 for v in shape) \
            or shape[0] not in (1, 3):
        raise _bad(mp, "shape", shape, "3 positive integers [C, H, W] with C = 1 or 3")
    if not _is_int(meta.get("num_classes")) or meta["num_classes"] < 2:
        raise _bad(mp, "num_classes", meta.get("num_classes"), "an integer >= 2")
    for key, positive in (("mean", False), ("std", True)):
        v = meta.get(key)
        ok = isinstance(v, list) and len(v) == shape[0] and all(
            isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and (x > 0 or not positive)
            for x in v)
        if not ok:
            raise _bad(mp, key, v, f"{shape[0]} finite numbers (one per channel){', each > 0' if positive else ''}")
    if meta.get("write_mode") not in ("raw", "jpg"):
        raise _bad(mp, "write_mode", meta.get("write_mode"), "'raw' or 'jpg'")
    if meta.get("lossy") is not (meta["write_mode"] == "jpg"):
        raise _bad(mp, "lossy", meta.get("lossy"), f"{meta['write_mode'] == 'jpg'} for write_mode "
                   f"{meta['write_mode']!r}")
    if meta["lossy"] and not (_is_int(meta.get("jpeg_quality")) and 1 <= meta["jpeg_quality"] <= 100):
        raise _bad(mp, "jpeg_quality", meta.get("jpeg_quality"), "an integer in [1, 100] for write_mode 'jpg'")
    if not isinstance(meta.get("source"), str):
        raise _bad(mp, "source", meta.get("source"), "a string")
    splits = meta.get("splits")
    if not isinstance(splits, dict):
        raise _bad(mp, "splits", splits, "a JSON object with train, val, test")
    for name in SPLITS:
        info = splits.get(name)
        if not isinstance(info, dict):
            raise _bad(mp, f"splits.{name}", info, "a JSON object (num_samples, bytes, sha256)")
        for key in ("num_samples", "bytes"):
            if not _is_int(info.get(key)) or info[key] < 0:
                raise _bad(mp, f"splits.{name}.{key}", info.get(key), "an integer >= 0")
        digest = info.get("sha256")
        if not isinstance(digest, str) or len(digest) != 64:
            raise _bad(mp, f"splits.{name}.sha256", digest, "a SHA-256 hex digest (64 characters)")


class BetonDir:
    """A directory written by :func:`write_betons`, validated on open: beton.json's keys and values, each split
    file's size, structure and (``verify``, the default; data.verify) SHA-256 against beton.json. The hash reads
    every byte once: about 1 s per GB on one core; ``verify=False`` (``--data.verify=false``) skips only it."""

    def __init__(self, root: Path | str, *, verify: bool = True):
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f"beton directory not found: {self.root} (write one with `pst-dist write-beton`)")
        mp = self.root / META
        if not mp.is_file():
            raise DataError(f"{self.root}: no {META}; not a directory written by `pst-dist write-beton`")
        self.meta = read_json(mp, META, DataError)
        check_meta(self.meta, mp)
        for name in SPLITS:  # the checks without ffcv first: importing it takes seconds
            info, path = self.meta["splits"][name], self.file(name)
            if not path.is_file():
                raise DataError(f"missing split file: {path}")
            if path.stat().st_size != info["bytes"]:
                raise DataError(f"{path}: {path.stat().st_size} bytes, {META} says {info['bytes']}: truncated or "
                                f"replaced")
            if verify and sha256(path) != info["sha256"]:
                raise DataError(f"{path}: changed since it was written (its SHA-256 differs from {META}'s): refusing "
                                f"to train on it. The check reads the file once (about 1 s per GB); "
                                f"--data.verify=false skips it")
        _need_ffcv()
        for name in SPLITS:
            info = self.meta["splits"][name]
            check_beton(self.file(name), info["num_samples"], info["bytes"], tuple(self.meta["shape"][1:]),
                        self.meta["num_classes"])
        self.channels = int(self.meta["shape"][0])

    def file(self, split: str) -> Path:
        return self.root / f"{split}.beton"

    def __len__(self) -> int:
        return self.meta["splits"]["train"]["num_samples"]

    def batches(self, split: str, batch_size: int, **kw) -> BetonBatches:
        """An FFCV loader over one split (keyword arguments: see :class:`BetonBatches`)."""
        return BetonBatches(self.file(split), self.meta["shape"], batch_size, **kw)

    def read_split(self, split: str, limit: int | None = None, num_workers: int = 2) -> Split:
        """Decode (the first ``limit`` images of) a split into memory, in file order, without augmentation: each
        batch is copied into tensors of the split's size, made once (the split is held once, not twice)."""
        total = self.meta["splits"][split]["num_samples"]
        total = total if limit is None else min(limit, total)
        images = labels = None
        n = 0
        for x, y in self.batches(split, 512, shuffle=False, augment="none", drop_last=False,
                                 num_workers=num_workers):
            if images is None:
                images = torch.empty((total, *x.shape[1:]), dtype=x.dtype)
                labels = torch.empty((total, *y.shape[1:]), dtype=y.dtype)
            take = min(len(y), total - n)
            images[n:n + take] = x[:take]  # a copy: FFCV reuses its output buffers
            labels[n:n + take] = y[:take]
            n += take
            if n >= total:
                break
        if images is None or n < total:
            raise DataError(f"{self.file(split)}: gave {n} of the {total} images its {META} lists" if total else
                            f"{self.file(split)}: holds no images")
        return Split(images, labels)


# ---------------------------------------------------------------------------------------------------------------
# loading


def _sharded_order_cls():
    # optional heavy dependency (FFCV), imported only for .beton files
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
            order = shard_order(len(self.indices), self.order_seed, epoch, self.rank, self.world_size, self.shuffle)
            return self.indices[order.numpy()]

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
        # optional heavy dependency (FFCV), imported only for .beton files
        from ffcv.fields.decoders import IntDecoder, RandomResizedCropRGBImageDecoder, SimpleRGBImageDecoder
        from ffcv.loader import Loader  # optional heavy dependency (FFCV), imported only for .beton files

        # optional heavy dependency (FFCV), imported only for .beton files
        from ffcv.transforms import RandomHorizontalFlip, RandomTranslate, Squeeze, ToDevice, ToTensor, ToTorchImage


        c, h, w = shape
        if augment not in ("none", "crop", "crop_flip", "rrc_flip"):
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
