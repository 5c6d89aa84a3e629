"""Two inference-side changes probed on a bench's trained PST cells, on *validation* accuracy (the test split is not
read): re-estimating BatchNorm statistics on the raw (poisoned) training images after training, and evaluating on a
blurred copy of each image (alone, and averaged with the raw image's prediction). Each cell's own recorded config and
cached poison; nothing is written.

    python launch/eval_probes.py runs/bench_fmnist --attacks none,conv_blur,em,lsp

Prints one row per cell: validation accuracy (%) as trained, after the BatchNorm re-estimate (4096 training images,
cumulative average), on blur(sigma) of the image, and on the mean of the raw and blurred predictions."""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from torch.optim.swa_utils import update_bn  # noqa: E402

from pst_dist.cli import run_script  # noqa: E402
from pst_dist.data.pipeline import Normalize, build_data  # noqa: E402
from pst_dist.evaluate import load_run_model, recorded_config  # noqa: E402
from pst_dist.matrix import cell_data_cfg  # noqa: E402
from pst_dist.pst.views import apply_view  # noqa: E402
from pst_dist.train import predict  # noqa: E402

COLUMNS = ("as trained", "BN re-estimated", "blurred", "raw + blurred")


def accuracy(probs: torch.Tensor, labels: torch.Tensor) -> float:
    return 100 * (probs.argmax(1) == labels).float().mean().item()


def bn_reestimated(model: torch.nn.Module, images: torch.Tensor, norm: Normalize, n: int = 4096) -> torch.nn.Module:
    """A copy of ``model`` whose BatchNorm statistics are the cumulative average over ``n`` of ``images``."""
    m = copy.deepcopy(model)
    idx = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))[:n]
    update_bn((norm(images[idx[i: i + 256]].float() / 255) for i in range(0, len(idx), 256)), m)
    return m.eval()


def probe(cell: Path, bench: Path, attack: str, seed: int, sigma: float) -> list[float]:
    cfg = recorded_config(cell)
    data = build_data(cell_data_cfg(cfg, None if attack == "none" else bench / "poisons" / f"{attack}_seed{seed}"))
    if data.stream is not None or data.beton is not None:  # only their first images are in memory
        raise SystemExit(f"{cell}: its training images are read from disk batch by batch (a streamed image folder "
                         f"or a .beton); this probe re-estimates BatchNorm on training images held in memory")
    model = load_run_model(cell, own_data=data, cfg=cfg).model.eval()
    norm = Normalize(data.mean, data.std, torch.device("cpu"))
    x, y = data.splits.val.images.float() / 255, data.splits.val.labels
    with torch.no_grad():
        raw = model(norm(x)).softmax(1)
        blurred = model(norm(apply_view(x, f"blur:{sigma:g}"))).softmax(1)
        recal = bn_reestimated(model, data.poisoned_train, norm)(norm(x)).softmax(1)
        both = predict(model, x, norm, [f"blur:{sigma:g}"])  # what schedule.eval_views = ["blur:<sigma>"] scores
    return [accuracy(raw, y), accuracy(recal, y), accuracy(blurred, y), accuracy(both, y)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bench", type=Path, help="a bench's output directory (bench.out)")
    ap.add_argument("--attacks", default="none,conv_blur,em,lsp")
    ap.add_argument("--defense", default="pst")
    ap.add_argument("--sigma", type=float, default=0.7, help="the blur's sigma in px")
    args = ap.parse_args()
    torch.set_num_threads(2)
    print(f"| attack | seed | {' | '.join(COLUMNS)} |\n|---|---:|" + "---:|" * len(COLUMNS))
    means: dict[str, list[list[float]]] = {}
    for attack in args.attacks.split(","):
        cells = sorted((args.bench / "cells" / attack / args.defense).glob("seed*"))
        if not cells:
            sys.exit(f"no {args.defense} cells of attack {attack!r} under {args.bench / 'cells'}")
        for cell in cells:
            seed = int(cell.name.removeprefix("seed"))
            accs = probe(cell, args.bench, attack, seed, args.sigma)
            means.setdefault(attack, []).append(accs)
            print(f"| {attack} | {seed} | " + " | ".join(f"{a:.2f}" for a in accs) + " |", flush=True)
    for attack, rows in means.items():
        print(f"| {attack} | mean | " + " | ".join(f"{statistics.fmean(c):.2f}" for c in zip(*rows, strict=True))
              + " |")


if __name__ == "__main__":
    sys.exit(run_script("eval_probes.py", main))
