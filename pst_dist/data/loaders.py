"""In-memory batch loader over uint8 tensors: deterministic per (seed, epoch), sharded per rank, augmenting on the
batch. The trainer accepts any iterable of (uint8 images, labels); this is the default one."""

from __future__ import annotations

import torch
from torchvision.transforms.v2 import functional as F

RRC_SCALE = (0.35, 1.0)
RRC_RATIO = (3 / 4, 4 / 3)


def rrc_params(h: int, w: int, g: torch.Generator, scale=RRC_SCALE, ratio=RRC_RATIO) -> tuple[int, int, int, int]:
    """Random-resized-crop box (top, left, height, width), torchvision's rule, drawn from ``g``."""
    area = h * w
    log_r = torch.log(torch.tensor(ratio))
    for _ in range(10):
        a = area * float(torch.empty(1).uniform_(*scale, generator=g))
        r = float(torch.exp(torch.empty(1).uniform_(float(log_r[0]), float(log_r[1]), generator=g)))
        cw, ch = int(round((a * r) ** 0.5)), int(round((a / r) ** 0.5))
        if 0 < cw <= w and 0 < ch <= h:
            top = int(torch.randint(0, h - ch + 1, (1,), generator=g))
            left = int(torch.randint(0, w - cw + 1, (1,), generator=g))
            return top, left, ch, cw
    return 0, 0, h, w  # fallback: whole image


def ueraser_lite(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Heavy random augmentation against shortcut perturbations (UEraser-style, lighter), per sample on a uint8
    batch already pad-cropped and flipped: brightness and contrast x U(0.4, 1.6), channel shuffle (3 channels,
    p = 0.5), posterise to 3-6 bits, and one random-valued erased rectangle (p = 0.5, up to half of each side)."""
    n, c, h, w = x.shape
    f = x.float()
    bright = torch.empty(n, 1, 1, 1).uniform_(0.4, 1.6, generator=g)
    contrast = torch.empty(n, 1, 1, 1).uniform_(0.4, 1.6, generator=g)
    mean = f.mean(dim=(1, 2, 3), keepdim=True)
    f = ((f * bright - mean * bright) * contrast + mean * bright).clamp(0, 255)
    if c == 3:
        perm = torch.argsort(torch.rand(n, 3, generator=g), dim=1)
        shuffle = torch.rand(n, generator=g) < 0.5
        perm = torch.where(shuffle[:, None], perm, torch.arange(3)[None])
        f = f.gather(1, perm[:, :, None, None].expand(n, c, h, w))
    levels = 2 ** torch.randint(3, 7, (n, 1, 1, 1), generator=g).float()
    f = (f / 256 * levels).floor() * (255 / (levels - 1))  # posterise: levels evenly spread over 0..255
    eh = (torch.rand(n, generator=g) * h / 2).long() + 1
    ew = (torch.rand(n, generator=g) * w / 2).long() + 1
    top = (torch.rand(n, generator=g) * (h - eh + 1)).long()
    left = (torch.rand(n, generator=g) * (w - ew + 1)).long()
    rows, cols = torch.arange(h)[None, :], torch.arange(w)[None, :]
    box = (((rows >= top[:, None]) & (rows < (top + eh)[:, None]))[:, :, None]
           & ((cols >= left[:, None]) & (cols < (left + ew)[:, None]))[:, None, :])  # n x h x w
    box &= (torch.rand(n, generator=g) < 0.5)[:, None, None]
    fill = torch.randint(0, 256, (n, c, h, w), generator=g).float()
    f = torch.where(box[:, None], fill, f)
    return f.round().clamp(0, 255).to(torch.uint8)


def augment_batch(x: torch.Tensor, mode: str, g: torch.Generator) -> torch.Tensor:
    """Pad-crop (pad = side/8, reflect-free zero pad) and horizontal flip on a uint8 batch, per sample;
    or random resized crop + flip (``rrc_flip``), per sample, back to the input size; ``ueraser``: crop + flip, then
    :func:`ueraser_lite`."""
    if mode == "none":
        return x
    if mode == "ueraser":
        return ueraser_lite(augment_batch(x, "crop_flip", g), g)
    if mode == "rrc_flip":
        n, _, h, w = x.shape
        out = torch.empty_like(x)
        flips = torch.rand(n, generator=g) < 0.5
        for i in range(n):
            top, left, ch, cw = rrc_params(h, w, g)
            img = F.resized_crop(x[i], top, left, ch, cw, [h, w], antialias=True)
            out[i] = img.flip(-1) if flips[i] else img
        return out
    n, c, h, w = x.shape
    pad = max(1, h // 8)
    xp = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    oy = torch.randint(0, 2 * pad + 1, (n,), generator=g)
    ox = torch.randint(0, 2 * pad + 1, (n,), generator=g)
    rows = (oy[:, None] + torch.arange(h)[None])  # n x h
    cols = (ox[:, None] + torch.arange(w)[None])  # n x w
    if mode == "crop_flip":
        flip = torch.rand(n, generator=g) < 0.5
        cols = torch.where(flip[:, None], cols.flip(1), cols)
    idx_r = rows[:, None, :, None].expand(n, c, h, w + 2 * pad)
    x = xp.gather(2, idx_r)
    idx_c = cols[:, None, None, :].expand(n, c, h, w)
    return x.gather(3, idx_c)


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
    """Batches of (uint8 images, int64 labels) from in-memory tensors.

    Order and augmentation are a function of (seed, epoch) only, so a resumed run sees the same batches.
    With ``world_size > 1`` each rank takes a disjoint strided shard of the same permutation.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, *, shuffle: bool = True,
                 augment: str = "none", seed: int = 0, drop_last: bool = False, rank: int = 0, world_size: int = 1):
        self.images, self.labels = images, labels
        self.batch_size, self.shuffle, self.augment = batch_size, shuffle, augment
        self.seed, self.drop_last, self.rank, self.world_size = seed, drop_last, rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _indices(self) -> torch.Tensor:
        return shard_order(len(self.labels), self.seed, self.epoch, self.rank, self.world_size, self.shuffle)

    def __len__(self) -> int:
        n = len(self._indices())
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self):
        idx = self._indices()
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch + 7_777_777)
        for b in range(len(self)):
            sel = idx[b * self.batch_size: (b + 1) * self.batch_size]
            yield augment_batch(self.images[sel], self.augment, g), self.labels[sel]
