"""How long the training loop waits for its data: the in-memory loader synchronous (``data.prefetch=0``: each batch
gathered and augmented when the loop asks for it) against prefetching (a background thread keeps batches ready),
side by side in one run, same model, data, batch and augmentation. With ``--folder``: the same images written as
an image folder of JPEG files (at twice the side, resized when read), read into memory first against streamed from
the files (``data.stream=true``: ``--workers`` DataLoader processes decoding each batch's files ahead of the step).

    .venv/bin/python bench/data_wait.py [--epochs 3] [--augment crop_flip] [--folder] [--repeats 3] [--out f.jsonl]

Default: ResNet-18 x0.25 at 32 px, synthetic data, batch 128, on this machine's device. Printed per setting: img/s,
step time, and the data-wait fraction (time blocked on the loader / wall time of the epoch), averaged over the epochs
after the first; then the ratio of the two (with ``--repeats``: the settings alternate, and the medians and the
ratios' range are printed).
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from pst_dist.config import load_config
from pst_dist.data.pipeline import build_data
from pst_dist.data.sources import synthetic_images
from pst_dist.report import ratio_summary
from pst_dist.train import train


def measure(over: list[str], data) -> dict:
    with tempfile.TemporaryDirectory() as d:
        cfg = load_config(None, [*over, f"--log.run_dir={Path(d) / 'run'}"])
        return train(cfg, data=data)["throughput"]


def val_images(images: int) -> int:
    return max(20, images // 5)


def write_folder(root: Path, images: int, side: int) -> None:
    """The synthetic set as an image folder: train/<class>/*.jpg (``images`` files) and val/<class>/*.jpg (a fifth
    of that), JPEG quality 90, ``side`` pixels square."""
    for split, n, seed in (("train", images, 0), ("val", val_images(images), 1)):
        s = synthetic_images(n, 10, side, seed)
        for i, (x, y) in enumerate(zip(s.images, s.labels.tolist(), strict=True)):
            d = root / split / f"c{y}"
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.ascontiguousarray(x.permute(1, 2, 0).numpy())).save(d / f"{i:06d}.jpg", quality=90)


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=3, help="epochs per setting (the first is not timed)")
    ap.add_argument("--augment", default="crop_flip", help="data.augment")
    ap.add_argument("--images", type=int, default=6144, help="synthetic training images")
    ap.add_argument("--size", type=int, default=32, help="image side")
    ap.add_argument("--batch", type=int, default=128, help="train.batch_size")
    ap.add_argument("--width", type=float, default=0.25, help="model.width of the ResNet-18")
    ap.add_argument("--out", help="append one JSON line per setting here")
    ap.add_argument("--folder", action="store_true", help="an image folder read into memory against streamed")
    ap.add_argument("--workers", type=int, default=1, help="data.loader_workers (decoding processes) for --folder")
    ap.add_argument("--threads", type=int, default=0, help="train.threads (0: torch's default)")
    ap.add_argument("--repeats", type=int, default=1,
                    help="measure the two settings this many times, alternating (a b a b ...): the ratio's median and "
                         "range (a 2-core machine moves single ratios by about 10 %%)")
    args = ap.parse_args(argv)
    if args.repeats < 1:
        ap.error(f"--repeats {args.repeats}: need >= 1")
    over = ["--model.name=resnet18", f"--model.width={args.width}", f"--data.img_size={args.size}",
            "--data.probe_size=128", f"--data.augment={args.augment}",
            f"--train.batch_size={args.batch}", f"--train.epochs={args.epochs}", f"--train.eval_every={args.epochs}",
            "--train.checkpoint_every=0", f"--train.threads={args.threads}", "--log.tensorboard=false",
            "--log.progress=false"]
    with tempfile.TemporaryDirectory() as tmp:
        if args.folder:
            write_folder(Path(tmp) / "folder", args.images, 2 * args.size)
            over += ["--data.source=imagefolder", f"--data.root={Path(tmp) / 'folder'}", "--data.val_from=test",
                     f"--data.val_size={min(256, val_images(args.images) // 2)}",
                     f"--data.loader_workers={args.workers}", "--data.prefetch=2"]
            settings = (("in-memory", ["--data.stream=false"]), ("streamed", ["--data.stream=true"]))
        else:
            over += ["--data.source=synthetic", f"--data.synthetic_train={args.images}", "--data.val_size=256"]
            settings = (("synchronous", ["--data.prefetch=0"]), ("prefetching", ["--data.prefetch=2"]))
        rows = []
        shared = None if args.folder else build_data(load_config(None, over))  # prefetch does not change the data
        for repeat, (label, setting) in itertools.product(range(args.repeats), settings):
            data = shared if shared is not None else build_data(load_config(None, [*over, *setting]))
            tp = measure([*over, *setting], data)
            row = {"loader": label, "setting": " ".join(setting), "augment": args.augment, "size": args.size,
                   "batch": args.batch, "width": args.width, "threads": args.threads,
                   **({"workers": args.workers} if args.folder else {}),
                   "repeat": repeat, **tp}
            rows.append(row)
            print(f"{label:12s} ({' '.join(s.removeprefix('--') for s in setting)}): {tp['img_per_s']:,.0f} img/s, "
                  f"step {tp['step_ms']:.1f} ms, data wait {100 * tp['data_wait']:.1f}% of the epoch", flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps(row) + "\n")
    (a, b) = (label for label, _ in settings)
    pairs = list(zip(rows[::2], rows[1::2], strict=True))
    waits_a, waits_b = (statistics.median(r[i]["data_wait"] for r in pairs) for i in (0, 1))
    ratios = [rb["img_per_s"] / ra["img_per_s"] for ra, rb in pairs]
    print(f"data-wait fraction: {100 * waits_b:.1f}% {b} vs {100 * waits_a:.1f}% {a}; "
          f"throughput {ratio_summary(ratios)}")
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
