"""In-memory batch loader over uint8 tensors: deterministic per (seed, epoch), sharded per rank, augmenting whole
batches on the training device, loading ahead of the training step. The trainer accepts any iterable of (uint8
images, labels); this is the default one.

Augmentation is split in two: :func:`draw_params` draws every random number of a batch from the loader's CPU
generator (a few numbers per image, so the order and augmentation are a function of (seed, epoch) on any device),
and :func:`apply_params` applies them to the whole batch at once on the batch's device (gathers, one
``roi_align``, elementwise arithmetic: no per-sample Python loop). On the CPU the result is the one the per-sample
code gave, bit for bit (``crop``, ``crop_flip``, ``ueraser``).
"""

from __future__ import annotations

import math
import queue
import threading

import torch

from .sources import decoded, raise_first

RRC_SCALE = (0.35, 1.0)
RRC_RATIO = (3 / 4, 4 / 3)
RRC_TRIES = 10


def rrc_boxes(n: int, h: int, w: int, g: torch.Generator, scale=RRC_SCALE, ratio=RRC_RATIO) -> torch.Tensor:
    """Random-resized-crop boxes (n x 4: top, left, height, width), torchvision's rule (up to 10 tries of an area
    fraction in ``scale`` and a log-uniform aspect ratio in ``ratio``, the whole image when none fits), drawn from
    ``g`` for the whole batch at once."""
    area = torch.empty(n, RRC_TRIES, dtype=torch.float64).uniform_(*scale, generator=g) * (h * w)
    log_r = torch.empty(n, RRC_TRIES, dtype=torch.float64).uniform_(math.log(ratio[0]), math.log(ratio[1]),
                                                                      generator=g)
    r = torch.exp(log_r)
    cw, ch = torch.round(torch.sqrt(area * r)).long(), torch.round(torch.sqrt(area / r)).long()
    ok = (cw > 0) & (cw <= w) & (ch > 0) & (ch <= h)
    first = torch.where(ok.any(1), ok.long().argmax(1), -1)  # the first try that fits, -1: none did
    pick = first.clamp_min(0)[:, None]
    ch = torch.where(first >= 0, ch.gather(1, pick)[:, 0], h)
    cw = torch.where(first >= 0, cw.gather(1, pick)[:, 0], w)
    u = torch.rand(n, 2, dtype=torch.float64, generator=g)
    top = (u[:, 0] * (h - ch + 1)).long().clamp_max(h - ch)
    left = (u[:, 1] * (w - cw + 1)).long().clamp_max(w - cw)
    return torch.stack([top, left, ch, cw], 1)


def draw_params(mode: str, shape: tuple[int, ...], g: torch.Generator, device: torch.device | None = None
                ) -> dict[str, torch.Tensor]:
    """Every random number one batch of ``shape`` (N, C, H, W) needs under ``mode``, drawn from the CPU generator
    ``g`` in a fixed order. ``device``: where the batch will be augmented; ``ueraser``'s per-pixel fill is drawn from
    ``g`` on the CPU, elsewhere from a generator on that device seeded from ``g`` (the CPU would be the bottleneck)."""
    n, c, h, w = shape
    p: dict[str, torch.Tensor] = {}
    if mode == "none":
        return p
    if mode == "rrc_flip":
        p["box"] = rrc_boxes(n, h, w, g)
        p["flip"] = torch.rand(n, generator=g) < 0.5
        return p
    pad = max(1, h // 8)
    p["oy"] = torch.randint(0, 2 * pad + 1, (n,), generator=g)
    p["ox"] = torch.randint(0, 2 * pad + 1, (n,), generator=g)
    if mode in ("crop_flip", "ueraser"):
        p["flip"] = torch.rand(n, generator=g) < 0.5
    if mode == "ueraser":
        p["bright"] = torch.empty(n, 1, 1, 1).uniform_(0.4, 1.6, generator=g)
        p["contrast"] = torch.empty(n, 1, 1, 1).uniform_(0.4, 1.6, generator=g)
        if c == 3:
            perm = torch.argsort(torch.rand(n, 3, generator=g), dim=1)
            shuffle = torch.rand(n, generator=g) < 0.5
            p["perm"] = torch.where(shuffle[:, None], perm, torch.arange(3)[None])
        p["levels"] = 2 ** torch.randint(3, 7, (n, 1, 1, 1), generator=g).float()
        eh = (torch.rand(n, generator=g) * h / 2).long() + 1
        ew = (torch.rand(n, generator=g) * w / 2).long() + 1
        top = (torch.rand(n, generator=g) * (h - eh + 1)).long()
        left = (torch.rand(n, generator=g) * (w - ew + 1)).long()
        p["erase"] = torch.stack([top, left, eh, ew], 1)
        p["erase_on"] = torch.rand(n, generator=g) < 0.5
        if device is None or torch.device(device).type == "cpu":
            p["fill"] = torch.randint(0, 256, (n, c, h, w), generator=g).to(torch.uint8)
        else:
            p["fill_seed"] = torch.randint(0, 2**62, (1,), generator=g)
    return p


def apply_params(x: torch.Tensor, mode: str, p: dict[str, torch.Tensor]) -> torch.Tensor:
    """Augment the uint8 batch ``x`` with :func:`draw_params`' numbers (already on ``x``'s device), batched."""
    if mode == "none":
        return x
    if mode == "rrc_flip":
        return _resized_crop(x, p["box"], p["flip"])
    x = _pad_crop(x, p["oy"], p["ox"], p.get("flip"))
    return _ueraser(x, p) if mode == "ueraser" else x


def augment_batch(x: torch.Tensor, mode: str, g: torch.Generator) -> torch.Tensor:
    """Pad-crop (pad = side/8, zero pad) with a horizontal flip (``crop_flip``) or without (``crop``); random resized
    crop + flip (``rrc_flip``) back to the input size; ``ueraser``: crop + flip, then :func:`_ueraser`. Random
    numbers from the CPU generator ``g``; computed on ``x``'s device."""
    return apply_params(x, mode, to_device(draw_params(mode, tuple(x.shape), g, x.device), x.device))


def to_device(p: dict[str, torch.Tensor], device: torch.device, pin: bool = False) -> dict[str, torch.Tensor]:
    """:func:`draw_params`' numbers on ``device`` (non-blocking, from pinned memory with ``pin``), but for the seed
    of an on-device generator, which stays on the host."""
    out = {}
    for k, v in p.items():
        if k != "fill_seed":
            v = (v.pin_memory() if pin else v).to(device, non_blocking=True)
        out[k] = v
    return out


def _pad_crop(x: torch.Tensor, oy: torch.Tensor, ox: torch.Tensor, flip: torch.Tensor | None) -> torch.Tensor:
    n, c, h, w = x.shape
    pad = max(1, h // 8)
    xp = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    rows = oy[:, None] + torch.arange(h, device=x.device)[None]  # n x h
    cols = ox[:, None] + torch.arange(w, device=x.device)[None]  # n x w
    if flip is not None:
        cols = torch.where(flip[:, None], cols.flip(1), cols)
    x = xp.gather(2, rows[:, None, :, None].expand(n, c, h, w + 2 * pad))
    return x.gather(3, cols[:, None, None, :].expand(n, c, h, w))


def _resized_crop(x: torch.Tensor, box: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """Each image's box resized (bilinear, averaging several samples per output pixel where the box is larger than
    the output: torchvision's ``roi_align``) to the input size, flipped where ``flip``."""
    from torchvision.ops import roi_align  # torchvision's compiled ops load on first use: only rrc_flip needs them

    n, _, h, w = x.shape
    top, left, ch, cw = box.to(torch.float32).unbind(1)
    rois = torch.stack([torch.arange(n, device=x.device, dtype=torch.float32), left, top, left + cw, top + ch], 1)
    out = roi_align(x.float(), rois, (h, w), spatial_scale=1.0, sampling_ratio=-1, aligned=True)
    out = torch.where(flip[:, None, None, None], out.flip(-1), out)
    return out.round_().clamp_(0, 255).to(torch.uint8)


def _ueraser(x: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
    """Heavy random augmentation against shortcut perturbations (UEraser-style, lighter) on a uint8 batch already
    pad-cropped and flipped: brightness and contrast x U(0.4, 1.6), channel shuffle (3 channels, p = 0.5),
    posterise to 3-6 bits, and one random-valued erased rectangle (p = 0.5, up to half of each side)."""
    n, c, h, w = x.shape
    f = x.float()
    bright, contrast = p["bright"], p["contrast"]
    mean = f.mean(dim=(1, 2, 3), keepdim=True)
    f = ((f * bright - mean * bright) * contrast + mean * bright).clamp(0, 255)
    if "perm" in p:
        f = f.gather(1, p["perm"][:, :, None, None].expand(n, c, h, w))
    levels = p["levels"]
    f = (f / 256 * levels).floor() * (255 / (levels - 1))  # posterise: levels evenly spread over 0..255
    top, left, eh, ew = p["erase"].unbind(1)
    rows, cols = torch.arange(h, device=x.device)[None, :], torch.arange(w, device=x.device)[None, :]
    box = (((rows >= top[:, None]) & (rows < (top + eh)[:, None]))[:, :, None]
           & ((cols >= left[:, None]) & (cols < (left + ew)[:, None]))[:, None, :])  # n x h x w
    box &= p["erase_on"][:, None, None]
    if "fill" in p:
        fill = p["fill"]
    else:
        gd = torch.Generator(device=x.device).manual_seed(int(p["fill_seed"]))
        fill = torch.randint(0, 256, (n, c, h, w), generator=gd, device=x.device, dtype=torch.uint8)
    f = torch.where(box[:, None], fill.float(), f)
    return f.round().clamp(0, 255).to(torch.uint8)


def shard_order(n: int, seed: int, epoch: int, rank: int = 0, world_size: int = 1, shuffle: bool = True
                ) -> torch.Tensor:
    """Rows rank ``rank`` visits in ``epoch``: one permutation from (seed, epoch) shared by all ranks, rank r taking
    positions r, r + W, ... of its first (n // W) * W entries. Disjoint shards without padding duplicates; the torch
    path (:class:`TensorBatches`) and the FFCV path (``pst_dist.data.beton``) both use it, so they visit the same
    rows in the same order."""
    if shuffle:
        g = torch.Generator().manual_seed(seed * 100_003 + epoch)
        idx = torch.randperm(n, generator=g)
    else:
        idx = torch.arange(n)
    per_rank = n // world_size
    return idx[rank: per_rank * world_size: world_size]


class TensorBatches:
    """Batches of (uint8 images, int64 labels) from in-memory tensors, augmented and on ``device``.

    Order and augmentation are a function of (seed, epoch) only, so a resumed run sees the same batches.
    With ``world_size > 1`` each rank takes a disjoint strided shard of the same permutation.
    ``on_device``: the whole set is copied to ``device`` once and each batch is gathered and augmented there, in the
    training thread (a handful of kernel launches per batch: nothing to overlap). Otherwise, with ``prefetch`` > 0, a
    background thread gathers the next batches on the host (pinned, copied to a CUDA device on a side stream and
    augmented there) while the current one trains; with 0 each batch is prepared when the loop asks for it.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, *, shuffle: bool = True,
                 augment: str = "none", seed: int = 0, drop_last: bool = False, rank: int = 0, world_size: int = 1,
                 device: torch.device | str = "cpu", prefetch: int = 0, on_device: bool = False):
        self.images, self.labels = images, labels
        self.batch_size, self.shuffle, self.augment = batch_size, shuffle, augment
        self.seed, self.drop_last, self.rank, self.world_size = seed, drop_last, rank, world_size
        self.device, self.prefetch = torch.device(device), prefetch
        self.on_device = on_device
        self._resident: tuple[torch.Tensor, torch.Tensor] | None = None
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _indices(self) -> torch.Tensor:
        return shard_order(len(self.labels), self.seed, self.epoch, self.rank, self.world_size, self.shuffle)

    def __len__(self) -> int:
        n = len(self._indices())
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def _source(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(images, labels, this epoch's row order), on the device for an on-device set (copied there once)."""
        idx = self._indices()
        if not self.on_device:
            return self.images, self.labels, idx
        if self._resident is None:
            self._resident = (self.images.to(self.device), self.labels.to(self.device))
        return *self._resident, idx.to(self.device)

    def _selections(self, idx: torch.Tensor) -> list[torch.Tensor]:
        """This epoch's batches as rows of the set, in order."""
        return [idx[b * self.batch_size: (b + 1) * self.batch_size] for b in range(len(self))]

    def _rows(self, images, labels: torch.Tensor, idx: torch.Tensor):
        """(uint8 images, labels) of each batch, before augmentation, in order."""
        for sel in self._selections(idx):
            yield images[sel], labels[sel]

    def _batches(self):
        """(uint8 images, labels) on the device, augmented, in order; runs in the prefetch thread when there is one."""
        images, labels, idx = self._source()
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch + 7_777_777)
        copy = self.device.type == "cuda" and not self.on_device  # host rows to the GPU, from pinned memory
        for x, y in self._rows(images, labels, idx):
            p = draw_params(self.augment, tuple(x.shape), g, self.device)
            if copy:
                x, y = x.pin_memory(), y.pin_memory()
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            p = to_device(p, self.device, pin=self.device.type == "cuda")
            yield apply_params(x, self.augment, p), y

    def __iter__(self):
        if self.prefetch <= 0 or self.on_device:
            return self._batches()
        return prefetched(self._batches, self.prefetch, self.device)


class FolderBatches(TensorBatches):
    """:class:`TensorBatches` over an image folder left on disk (a :class:`pst_dist.data.sources.FolderSplit`): the
    same rows in the same order with the same augmentation, each batch's files decoded ahead of the step by
    ``workers`` DataLoader processes (up to ``ahead`` batches each), so only those batches are in memory. The
    batches equal those of :class:`TensorBatches` over the decoded images, bit for bit."""

    def __init__(self, files, batch_size: int, *, workers: int = 2, ahead: int = 2, **kw):
        super().__init__(torch.empty(0, dtype=torch.uint8), files.labels, batch_size, on_device=False, **kw)
        self.files, self.workers, self.ahead = files, workers, ahead

    def _source(self):
        return self.files, self.labels, self._indices()

    def _rows(self, files, labels: torch.Tensor, idx: torch.Tensor):
        selections = self._selections(idx)
        for sel, (x, errors) in zip(selections, decoded(files, [s.tolist() for s in selections], self.workers,
                                                         self.ahead), strict=True):
            raise_first(errors)
            yield x, labels[sel]


def prefetched(make, depth: int, device: torch.device):
    """Iterate ``make()`` in a background thread, keeping up to ``depth`` items ready. On a CUDA ``device`` the
    thread's work runs on its own stream, and each item waits (on the device, not the host) for it before use.
    Errors in the thread are raised here; leaving the loop early stops the thread."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    cuda = device.type == "cuda"
    if cuda and device.index is None:  # the thread uses the device this (the training) thread has selected
        device = torch.device("cuda", torch.cuda.current_device())
    end = object()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        # one intra-op thread here: a second OpenMP team would compete with (and spin against) the training thread's;
        # torch takes the setting as the default of threads started later, so it is put back on the way out
        before = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            if cuda:
                torch.cuda.set_device(device)
                stream = torch.cuda.Stream(device)
                with torch.cuda.stream(stream):
                    for item in make():
                        ev = torch.cuda.Event()
                        ev.record(stream)
                        if not put((item, ev)):
                            return
            else:
                for item in make():
                    if not put((item, None)):
                        return
            put((end, None))
        except BaseException as e:  # noqa: BLE001 - handed to the consuming thread, which raises it
            put((e, None))
        finally:
            torch.set_num_threads(before)

    thread = threading.Thread(target=work, name="pst-dist-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item, ev = q.get()
            if item is end:
                return
            if isinstance(item, BaseException):
                raise item
            if ev is not None:
                current = torch.cuda.current_stream(device)
                current.wait_event(ev)
                for t in item:  # the side stream's memory is in use on this stream now
                    t.record_stream(current)
            yield item
    finally:
        stop.set()
        thread.join(timeout=10)
