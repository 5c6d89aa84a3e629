"""Screen: orthogonal projection (Sandoval-Segura et al., NeurIPS 2023, "What can we learn from unlearnable
datasets?") in front of a PST recipe, on a bench's cached poisons (docs/results/pst_one_recipe.md, section 38):

    python launch/projection_screen.py runs/bench_fmnist --config launch/configs/fmnist_one_recipe.toml \
        --attacks none,lsp,ops --seed 0 --out runs/probe_projection --baseline runs/bench_fmnist/results.csv

Per cell: a linear softmax classifier is fitted (L-BFGS, full batch) on the centered, flattened poisoned training
images; its accuracy on them and on the clean validation split is printed (their gap is a possible detector). Every
image of every split is then projected onto the orthogonal complement of the classifier's weights' span (k - 1
directions for k classes; centered at the
training mean), mapped by one affine map (the projected training images' 0.1 / 99.9 % quantiles to 0 / 255, the
same for validation and test: one preprocessing at training and test time) and rounded to uint8; the normalisation
statistics are recomputed as the pipeline does (the clean training split's); a linear classifier refitted on the
projected images says what linear signal is left. Then the recipe trains unchanged on them, in
``<out>/cells/<attack>/pst/seed<k>``. Validation and test accuracy per cell, with ``--baseline`` (a bench's
results.csv of the same recipe) beside the unprojected cell's validation. One row per cell in ``<out>/rows.jsonl``."""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pst_dist.cli import run_script  # noqa: E402
from pst_dist.data.pipeline import build_data, channel_stats  # noqa: E402
from pst_dist.io import write_atomic  # noqa: E402
from pst_dist.matrix import cell_cfg, cell_data_cfg, plan_bench  # noqa: E402
from pst_dist.rundir import OUTSIDE_DATA, RunDirError, holds_run  # noqa: E402
from pst_dist.train import train  # noqa: E402


def linear_fit(x: torch.Tensor, y: torch.Tensor, k: int, iters: int = 150,
               wd: float = 1e-4) -> tuple[torch.Tensor, torch.Tensor]:
    w = torch.zeros(x.shape[1], k, requires_grad=True)
    b = torch.zeros(k, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=iters, history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(x @ w + b, y) + wd * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach()


def accuracy(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> float:
    return float(((x @ w + b).argmax(1) == y).float().mean())


def flat(images: torch.Tensor) -> torch.Tensor:
    return images.reshape(len(images), -1).float() / 255


def screen(args: argparse.Namespace, attack: str) -> dict:
    bench = plan_bench(args.config, [f"--bench.out={args.out}", "--train.threads=1"])
    cfg = cell_cfg(bench.base, attack, "pst", args.seed, Path(args.out))
    data = build_data(cell_data_cfg(cfg, None if attack == "none" else
                                    str(Path(args.poisons) / "poisons" / f"{attack}_seed{args.seed}")))
    t0 = time.time()
    sp, shape, k = data.splits, data.poisoned_train.shape[1:], data.splits.num_classes
    x = flat(data.poisoned_train)
    mu = x.mean(0, keepdim=True)
    w, b = linear_fit(x - mu, sp.train.labels, k)
    lin_train = accuracy(x - mu, sp.train.labels, w, b)
    lin_val = accuracy(flat(sp.val.images) - mu, sp.val.labels, w, b)
    # an orthonormal basis of the weights' span: rank k - 1 (from zero, under weight decay, the k columns sum to 0),
    # so the directions of (numerically) zero singular value are left out
    u, sv, _ = torch.linalg.svd(w, full_matrices=False)
    q = u[:, sv > 1e-4 * sv[0]]

    def project(u: torch.Tensor) -> torch.Tensor:
        return (u - mu) - ((u - mu) @ q) @ q.T + mu

    xp = project(x)
    sample = xp.flatten()[torch.randperm(xp.numel(), generator=torch.Generator().manual_seed(0))[:1_000_000]]
    lo, hi = float(sample.quantile(0.001)), float(sample.quantile(0.999))

    def to_uint8(u: torch.Tensor) -> torch.Tensor:
        return (((u - lo) / (hi - lo)).clamp(0, 1) * 255).round().to(torch.uint8).reshape(len(u), *shape)

    def split(s):
        return dataclasses.replace(s, images=to_uint8(project(flat(s.images)))) if len(s.labels) else s

    poisoned = to_uint8(xp)
    w2, b2 = linear_fit(flat(poisoned) - mu, sp.train.labels, k)
    clean = split(sp.train)
    mean, std = channel_stats(clean.images)
    data = dataclasses.replace(data, poisoned_train=poisoned, mean=mean, std=std.clamp_min(1e-3),
                               poison_sha256=None, poison_path=None,  # projected: not the store's images
                               splits=dataclasses.replace(sp, train=clean, val=split(sp.val), test=split(sp.test)))
    row = {"attack": attack, "seed": args.seed, "directions": q.shape[1], "linear_train": lin_train,
           "linear_val": lin_val,
           "linear_train_after": accuracy(flat(poisoned) - mu, sp.train.labels, w2, b2),
           "clamped": float(((xp < lo) | (xp > hi)).float().mean()), "projection_seconds": time.time() - t0}
    run_dir = Path(cfg.log.run_dir)  # recorded first: the run's config does not rebuild the projected images
    if holds_run(run_dir):  # e.g. --out named the bench itself: its own cell is not marked
        raise RunDirError(f"{run_dir}: already holds a run; give --out a new directory")
    run_dir.mkdir(parents=True, exist_ok=True)
    said = (f"launch/projection_screen.py: every split projected off the {q.shape[1]} directions of a linear "
            f"classifier fitted on the training images, then mapped to uint8")
    write_atomic(run_dir / OUTSIDE_DATA, json.dumps({"what": said}))
    summary = train(cfg, data=data)
    row.update({key: summary[key] for key in ("final_val_acc", "final_test_acc", "peak_test_acc")})
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("poisons", help="a bench's out directory: its poisons/<attack>_seed<k> are read")
    p.add_argument("--config", required=True, help="the recipe (a pst-dist config with a [bench] section)")
    p.add_argument("--attacks", default="none,lsp,ops,em,conv_blur,classwise_noise,ar,rem")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="where the screen's runs go (a new directory per cell)")
    p.add_argument("--baseline", help="a results.csv of the same recipe on the unprojected poisons")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    base = {}
    if args.baseline:
        base = {r["attack"]: float(r["final_val_acc"]) for r in csv.DictReader(open(args.baseline))
                if r["defense"] == "pst" and int(r["seed"]) == args.seed}
    print("| cell | linear: train | linear: val | gap | after projection | val | unprojected val | change | test |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for attack in args.attacks.split(","):
        row = screen(args, attack)
        with open(Path(args.out) / "rows.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        v, ref = 100 * row["final_val_acc"], base.get(attack)
        print(f"| {attack} | {100 * row['linear_train']:.2f} | {100 * row['linear_val']:.2f} | "
              f"{100 * (row['linear_train'] - row['linear_val']):.1f} | {100 * row['linear_train_after']:.2f} | "
              f"{v:.2f} | {'' if ref is None else f'{100 * ref:.2f}'} | "
              f"{'' if ref is None else f'{v - 100 * ref:+.2f}'} | {100 * row['final_test_acc']:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(run_script("projection_screen.py", main))
