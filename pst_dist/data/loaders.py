"""In-memory batch loader over uint8 tensors: deterministic per (seed, epoch), sharded per rank, augmenting on the
batch. The trainer accepts any iterable of (uint8 images, labels); this is the default one."""

from __future__ import annotations

import torch


def augment_batch(x: torch.Tensor, mode: str, g: torch.Generator) -> torch.Tensor:
    """Pad-crop (pad = side/8, reflect-free zero pad) and horizontal flip on a uint8 batch, per sample."""
    if mode == "none":
        return x
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
        n = len(self.labels)
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            idx = torch.randperm(n, generator=g)
        else:
            idx = torch.arange(n)
        per_rank = n // self.world_size
        return idx[self.rank: per_rank * self.world_size: self.world_size]

    def __len__(self) -> int:
        n = len(self._indices())
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self):
        idx = self._indices()
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch + 7_777_777)
        for b in range(len(self)):
            sel = idx[b * self.batch_size: (b + 1) * self.batch_size]
            yield augment_batch(self.images[sel], self.augment, g), self.labels[sel]
