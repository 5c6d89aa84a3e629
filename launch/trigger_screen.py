"""Screens of trigger views on a bench's trained cells, from the *training* side only (no split is scored):

    python launch/trigger_screen.py final runs/probe_stay0 --views "randblur:2+quantize:3,blur:1,sharpen:2"
    python launch/trigger_screen.py trajectory runs/probe_sharpen --key detect/shortcut_gap
    python launch/trigger_screen.py spectral runs/bench_fmnist --config launch/configs/fmnist_one_recipe.toml
    python launch/trigger_screen.py mean runs/bench_fmnist --config launch/configs/fmnist_one_recipe.toml

``final``: each cell's last checkpoint on the first ``--probe`` images of its own (cached) poisoned training set: the
accuracy on them, on their clean copies (for reference: a detector does not have them), and the shortcut gap
acc(probe) - acc(view(probe)) of every view, as a markdown table. Random views draw from a generator seeded the same
for every cell. ``trajectory``: the value of a logged detector key (metrics.jsonl) per cell, over the run: its
maximum and where, its value at the logged step nearest each of four steps (value@step), and the first step it
exceeds each of ``--thresholds``; meant for runs whose trigger never fired (after a stage change the probe's view is
the next stage's). ``spectral``: the data check of ``trigger.spectral_check`` (before any training) on the clean
training split and on every cached poison of the bench (``poisons/<attack>_seed<k>``), with ``--config``'s data:
the class-wise spectral shift against the validation split, its sampling noise, their ratio and whether it exceeds
``--threshold``. ``mean``: the same for ``schedule.mean_repair``'s check (the class-wise significant mean shift,
in pixel levels), on the images as cached (a recipe whose spectral repair fires skips the check: its run says
``[pst] mean check skipped``). Nothing is written."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pst_dist.cli import run_script  # noqa: E402
from pst_dist.config import Config, load_config  # noqa: E402
from pst_dist.data.pipeline import Normalize, build_data  # noqa: E402
from pst_dist.evaluate import load_run_model, recorded_config  # noqa: E402
from pst_dist.matrix import cell_data_cfg  # noqa: E402
from pst_dist.pst.detectors import mean_shift_values, over_noise, spectral_values  # noqa: E402
from pst_dist.pst.views import apply_view  # noqa: E402


def cells(bench: Path, attacks: list[str], run: str) -> list[tuple[str, int, Path]]:
    """(attack, seed, cell dir) of every ``cells/<attack>/<run>/seed<k>``, by attack then seed."""
    out = [(a, int(c.name.removeprefix("seed")), c) for a in attacks
           for c in (bench / "cells" / a / run).glob("seed*") if c.name.removeprefix("seed").isdigit()]
    if not out:
        sys.exit(f"no {run!r} cells of {attacks} under {bench / 'cells'}")
    return sorted(out, key=lambda t: (attacks.index(t[0]), t[1]))


def final_gaps(cell: Path, bench: Path, attack: str, seed: int, views: list[str], n: int) -> list[float]:
    cfg = recorded_config(cell)
    data = build_data(cell_data_cfg(cfg, None if attack == "none" else bench / "poisons" / f"{attack}_seed{seed}"))
    model = load_run_model(cell, own_data=data, cfg=cfg).model.eval()
    norm = Normalize(data.mean, data.std, torch.device("cpu"), next(model.parameters()).dtype)
    x, y = data.poisoned_train[:n].float() / 255, data.splits.train.labels[:n]

    def acc(images: torch.Tensor) -> float:
        with torch.no_grad():
            return float((model(norm(images)).argmax(1) == y).float().mean())

    raw = acc(x)
    gaps = []
    for v in views:
        torch.manual_seed(1)  # random views: the same draws for every cell
        gaps.append(raw - acc(apply_view(x, v)))
    return [raw, acc(data.splits.train.images[:n].float() / 255), *gaps]


def trajectory(cell: Path, key: str, steps: list[int], thresholds: list[float]) -> str:
    rows = [json.loads(line) for line in (cell / "metrics.jsonl").read_text().splitlines()]
    v = {r["step"]: r[key] for r in rows if key in r}
    if not v:
        sys.exit(f"{cell}: no {key!r} in its metrics.jsonl")
    top = max(v, key=v.get)
    near = [min(v, key=lambda s, t=t: abs(s - t)) for t in steps]
    first = [next((str(s) for s in sorted(v) if v[s] > t), "—") for t in thresholds]
    return f"{v[top]:.3f} ({top}) | " + " / ".join(f"{v[s]:.3f}@{s}" for s in near) + " | " + " / ".join(first)


def poisons(bench: Path, attacks: list[str]) -> list[tuple[str, int | None, Path | None]]:
    """(attack, seed, cached poison) for every attack's ``poisons/<attack>_seed<k>``; ``none``: the clean split."""
    out = []
    for a in attacks:
        if a == "none":
            out.append((a, None, None))
            continue
        found = [(int(p.name.rsplit("_seed", 1)[1]), p) for p in (bench / "poisons").glob(f"{a}_seed*")
                 if p.name.rsplit("_seed", 1)[1].isdigit()]
        out += [(a, seed, p) for seed, p in sorted(found)]
    return out


def data_check(cfg: Config, poison: Path | None, values) -> tuple[float, float]:
    """(shift, noise) of a data check (``values``: spectral_values or mean_shift_values) on ``cfg``'s training split,
    poisoned with the cached ``poison`` (None: clean)."""
    data = build_data(cell_data_cfg(cfg, None if poison is None else str(poison)))
    val = data.splits.val
    return values(data.poisoned_train, data.splits.train.labels, val.images, val.labels)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("what", choices=["final", "trajectory", "spectral", "mean"])
    ap.add_argument("bench", type=Path, help="a bench's output directory (bench.out)")
    ap.add_argument("--attacks", default="none,classwise_noise,lsp,ar,ops,conv_blur,em,rem")
    ap.add_argument("--run", default="pst", help="the cells' run directory (cells/<attack>/<run>/seed<k>): a "
                    "defense's run, e.g. pst or standard")
    ap.add_argument("--views", default="randblur:2+quantize:3,blur:1,blur:2,median:1,downup:1,jpeg:1,quantize:3,"
                                       "sharpen:1,sharpen:2")
    ap.add_argument("--probe", type=int, default=2048, help="final: how many training images")
    ap.add_argument("--key", default="detect/shortcut_gap", help="trajectory: the metrics.jsonl key")
    ap.add_argument("--steps", default="160,320,480,620", help="trajectory: the value nearest each of these steps")
    ap.add_argument("--thresholds", default="0.04,0.06,0.08,0.1,0.15")
    ap.add_argument("--config", default="launch/configs/fmnist_one_recipe.toml",
                    help="spectral, mean: the data's config")
    ap.add_argument("--threshold", type=float, default=4.0, help="spectral, mean: trigger.spectral_check, "
                    "schedule.mean_repair")
    args = ap.parse_args()
    try:
        ths, steps = [float(t) for t in args.thresholds.split(",")], [int(s) for s in args.steps.split(",")]
    except ValueError as e:
        ap.error(f"--thresholds {args.thresholds!r} / --steps {args.steps!r}: comma-separated numbers ({e})")
    torch.set_num_threads(2)
    if args.what in ("spectral", "mean"):
        cfg = load_config(args.config)
        values = spectral_values if args.what == "spectral" else mean_shift_values
        print("| attack | seed | shift | noise | shift / noise | over the threshold |\n|---|---:|---:|---:|---:|---|")
        for attack, seed, poison in poisons(args.bench, args.attacks.split(",")):
            shift, noise = data_check(cfg, poison, values)
            print(f"| {attack} | {'—' if seed is None else seed} | {shift:.3f} | {noise:.3f} | {shift / noise:.1f} | "
                  f"{'yes' if over_noise(shift, noise, args.threshold) else 'no'} |", flush=True)
        return
    todo = cells(args.bench, args.attacks.split(","), args.run)
    if args.what == "final":
        views = args.views.split(",")
        print("| attack | seed | probe acc | its clean copies | " + " | ".join(views) + " |")
        print("|---|---:|---:|---:|" + "---:|" * len(views))
        for attack, seed, cell in todo:
            r = final_gaps(cell, args.bench, attack, seed, views, args.probe)
            print(f"| {attack} | {seed} | " + " | ".join(f"{a:.3f}" for a in r) + " |", flush=True)
    else:
        near = args.steps.replace(",", " / ")
        print(f"| attack | seed | max {args.key} (step) | value@step nearest {near} | first step "
              f"above {' / '.join(map(str, ths))} |\n|---|---:|---|---|---|")
        for attack, seed, cell in todo:
            print(f"| {attack} | {seed} | {trajectory(cell, args.key, steps, ths)} |")


if __name__ == "__main__":
    sys.exit(run_script("trigger_screen.py", main))
