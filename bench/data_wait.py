"""How long the training loop waits for its data: the in-memory loader synchronous (``data.prefetch=0``: each batch
gathered and augmented when the loop asks for it) against prefetching (a background thread keeps batches ready),
side by side in one run, same model, data, batch and augmentation.

    .venv/bin/python bench/data_wait.py [--epochs 3] [--augment crop_flip] [--out results.jsonl]

Default: ResNet-18 x0.25 at 32 px, synthetic data, batch 128, on this machine's device. Printed per setting: img/s,
step time, and the data-wait fraction (time blocked on the loader / wall time of the epoch), averaged over the epochs
after the first; then the ratio of the two.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from pst_dist.config import load_config
from pst_dist.data.pipeline import build_data
from pst_dist.train import train


def measure(over: list[str], prefetch: int, data) -> dict:
    with tempfile.TemporaryDirectory() as d:
        cfg = load_config(None, [*over, f"--data.prefetch={prefetch}", f"--log.run_dir={Path(d) / 'run'}"])
        return train(cfg, data=data)["throughput"]


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=3, help="epochs per setting (the first is not timed)")
    ap.add_argument("--augment", default="crop_flip", help="data.augment")
    ap.add_argument("--images", type=int, default=6144, help="synthetic training images")
    ap.add_argument("--size", type=int, default=32, help="image side")
    ap.add_argument("--batch", type=int, default=128, help="train.batch_size")
    ap.add_argument("--width", type=float, default=0.25, help="model.width of the ResNet-18")
    ap.add_argument("--out", help="append one JSON line per setting here")
    args = ap.parse_args(argv)
    over = ["--model.name=resnet18", f"--model.width={args.width}", "--data.source=synthetic",
            f"--data.synthetic_train={args.images}", f"--data.img_size={args.size}", "--data.val_size=256",
            "--data.probe_size=128", f"--data.augment={args.augment}", f"--train.batch_size={args.batch}",
            f"--train.epochs={args.epochs}", f"--train.eval_every={args.epochs}", "--train.checkpoint_every=0",
            "--log.tensorboard=false", "--log.progress=false"]
    data = build_data(load_config(None, over))
    rows = []
    for label, prefetch in (("synchronous", 0), ("prefetching", 2)):
        tp = measure(over, prefetch, data)
        row = {"loader": label, "prefetch": prefetch, "augment": args.augment, "size": args.size,
               "batch": args.batch, "width": args.width, **tp}
        rows.append(row)
        print(f"{label:12s} (data.prefetch={prefetch}): {tp['img_per_s']:,.0f} img/s, step {tp['step_ms']:.1f} ms, "
              f"data wait {100 * tp['data_wait']:.1f}% of the epoch", flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")
    sync, ahead = rows
    print(f"data-wait fraction: {100 * ahead['data_wait']:.1f}% prefetching vs {100 * sync['data_wait']:.1f}% "
          f"synchronous; throughput x{ahead['img_per_s'] / sync['img_per_s']:.2f}")
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
