"""Loader throughput, measured side by side in one run: images per second delivered to the training loop.

  .venv/bin/python bench/loader_throughput.py            # prints the table and the ratios
  .venv/bin/python bench/loader_throughput.py --md docs/results/loader_throughput.md

Pairs (same images, same augmentation, 2 workers each, batch 256):
  32 px, pad-crop (side/8) + flip:  FFCV raw .beton  vs  torch DataLoader over an in-memory uint8 tensor
                                     (and, for reference, pst-dist's own vectorised in-memory batches)
  64 px and 160 px, random resized crop (scale 0.35-1) + flip:
                                     FFCV raw and FFCV jpg .beton  vs  torchvision ImageFolder + PIL JPEG decoding
Each loader runs one untimed warm-up epoch first (FFCV's numba compile, ~5 s per process; DataLoader worker start),
then --epochs timed epochs. Run it on an otherwise idle machine: it measures the CPU.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset
from torchvision import datasets
from torchvision.transforms import v2

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from pst_dist.data import beton as B  # noqa: E402
from pst_dist.data.loaders import RRC_RATIO, RRC_SCALE, TensorBatches  # noqa: E402
from pst_dist.data.sources import synthetic_images  # noqa: E402

BATCH = 256


class TensorImages(Dataset):
    """Per-sample view of an in-memory uint8 tensor, augmented by torchvision transforms in the workers."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.transform(self.images[i]), self.labels[i]


def throughput(make, epochs: int) -> float:
    """Images per second over ``epochs`` timed epochs, after one warm-up epoch that is not timed."""
    loader = make()
    for epoch in range(epochs + 1):
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        if epoch == 1:
            t0, n = time.perf_counter(), 0
        for x, _ in loader:
            if epoch:
                n += len(x)
    return n / (time.perf_counter() - t0)


def write_jpegs(images: torch.Tensor, labels: torch.Tensor, root: Path, quality: int = 90) -> None:
    from PIL import Image

    for i, (x, y) in enumerate(zip(images, labels, strict=True)):
        d = root / f"c{int(y):02d}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(x.permute(1, 2, 0).numpy()).save(d / f"{i:06d}.jpg", quality=quality)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n32", type=int, default=20000, help="images in the 32 px set")
    ap.add_argument("--n64", type=int, default=8000, help="images in the 64 px set")
    ap.add_argument("--n160", type=int, default=3000, help="images in the 160 px set")
    ap.add_argument("--epochs", type=int, default=3, help="timed epochs per loader (after one warm-up)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--md", help="also write the table as markdown here")
    args = ap.parse_args()
    torch.set_num_threads(1)
    w, rows = args.workers, []
    with tempfile.TemporaryDirectory(prefix="loader_bench_") as tmp:
        tmp = Path(tmp)
        # ---- 32 px: FFCV raw vs torch DataLoader over an in-memory uint8 tensor -----------------------------
        s = synthetic_images(args.n32, 10, 32, seed=0)
        B.write_split(tmp / "s32.beton", s.images, s.labels, num_workers=w)
        B.check_beton(tmp / "s32.beton", len(s))
        tf = v2.Compose([v2.RandomCrop(32, padding=4), v2.RandomHorizontalFlip()])
        r = {
            "FFCV raw": throughput(lambda: B.BetonBatches(tmp / "s32.beton", (3, 32, 32), BATCH,
                                                           augment="crop_flip", num_workers=w), args.epochs),
            "torch DataLoader (tensor)": throughput(
                lambda: DataLoader(TensorImages(s.images, s.labels, tf), BATCH, shuffle=True, num_workers=w,
                                   drop_last=True, persistent_workers=True), args.epochs),
            "pst-dist TensorBatches (1 process)": throughput(
                lambda: TensorBatches(s.images, s.labels, BATCH, augment="crop_flip", drop_last=True), args.epochs),
        }
        rows.append(("32", r, "torch DataLoader (tensor)"))
        print(_fmt_block("32 px, pad-crop + flip", r, "torch DataLoader (tensor)"), flush=True)
        # ---- 64 and 160 px: FFCV raw / jpg vs ImageFolder + PIL ----------------------------------------------
        for side, n in ((64, args.n64), (160, args.n160)):
            r = bench_jpeg_size(side, n, tmp, w, args.epochs)
            rows.append((str(side), r, "ImageFolder + PIL"))
            print(_fmt_block(f"{side} px, random resized crop + flip", r, "ImageFolder + PIL"), flush=True)
    md = _markdown(rows, args)
    print("\n" + md)
    if args.md:
        Path(args.md).write_text(md)
    return 0


def bench_jpeg_size(side: int, n: int, tmp: Path, w: int, epochs: int) -> dict[str, float]:
    """FFCV raw / jpg vs torchvision ImageFolder + PIL on ``n`` JPEG files of ``side`` px."""
    s = synthetic_images(n, 10, side, seed=side)
    folder = tmp / f"if{side}"
    write_jpegs(s.images, s.labels, folder)
    ref = datasets.ImageFolder(str(folder))  # decoded once, so FFCV stores the same (JPEG-decoded) pixels
    pixels = torch.stack([v2.functional.pil_to_tensor(ref[i][0]) for i in range(len(ref))])
    labels = torch.tensor(ref.targets)
    files = {kind: tmp / f"{kind}{side}.beton" for kind in ("raw", "jpg")}
    B.write_split(files["raw"], pixels, labels, num_workers=w)
    B.write_split(files["jpg"], pixels, labels, write_mode="jpg", jpeg_quality=90, num_workers=w)
    for f in files.values():
        B.check_beton(f, len(labels))
    tf = v2.Compose([v2.RandomResizedCrop(side, scale=RRC_SCALE, ratio=RRC_RATIO), v2.RandomHorizontalFlip(),
                     v2.PILToTensor()])
    shape = (3, side, side)
    ffcv = lambda kind: lambda: B.BetonBatches(files[kind], shape, BATCH, augment="rrc_flip", num_workers=w)
    return {
        "FFCV raw": throughput(ffcv("raw"), epochs),
        "FFCV jpg": throughput(ffcv("jpg"), epochs),
        "ImageFolder + PIL": throughput(
            lambda: DataLoader(datasets.ImageFolder(str(folder), transform=tf), BATCH, shuffle=True, num_workers=w,
                               drop_last=True, persistent_workers=True), epochs),
    }


def _fmt_block(title: str, r: dict[str, float], base: str) -> str:
    lines = [title]
    for k, v in r.items():
        lines.append(f"  {k:<36s} {v:10.0f} img/s   ratio vs {base}: {v / r[base]:.2f}")
    return "\n".join(lines)


def _markdown(rows, args) -> str:
    out = ["# Loader throughput", "",
           f"`bench/loader_throughput.py` ({args.workers} workers each, batch {BATCH}, {args.epochs} timed epochs "
           f"after one untimed warm-up epoch that absorbs FFCV's numba compile; images {args.n32} at 32 px, "
           f"{args.n64} at 64 px, {args.n160} at 160 px).", "",
           "| size | loader | images/s | ratio vs baseline |", "|---|---|---:|---:|"]
    for side, r, base in rows:
        for k, v in r.items():
            out.append(f"| {side} px | {k} | {v:.0f} | {v / r[base]:.2f}{' (baseline)' if k == base else ''} |")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    sys.exit(main())
