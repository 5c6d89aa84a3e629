"""Search efficiency: ASHA vs the exhaustive search over the same PST schedules, side by side in one run.

Both searches run the same grid of schedules (``launch/configs/tune_fmnist.toml`` with a smaller space and a
Fashion-MNIST subset, see --help) on one local Ray: the exhaustive one trains every schedule for every epoch
(FIFO), ASHA stops weak trials at its rungs. Trials are deterministic (same seed), so a schedule's curve is the
same in both searches. Prints the best final-epoch validation accuracy each search finds, the gap in points, and
the training epochs each used; writes a markdown table with --md.

    .venv/bin/python bench/search_efficiency.py --md docs/results/search_efficiency.md
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pst_dist.config import load_config  # noqa: E402
from pst_dist.io import write_atomic  # noqa: E402
from tune.search import run_search  # noqa: E402


def search_config(args, scheduler: str):
    over = [
        f"--data.train_size={args.train_size}", f"--data.val_size={args.val_size}",
        f"--data.test_size={args.test_size}",
        f"--train.epochs={args.epochs}", f"--train.batch_size={args.batch_size}", "--schedule.check_every=10",
        "--tune.search=grid", f"--tune.scheduler={scheduler}", "--tune.warm_epochs=[0.5]", "--tune.thresholds=[0.2]",
        "--tune.freeze_epochs=[0.5, 1.0]", "--tune.release_epochs=[1.0]", "--tune.unfreeze_groups=[0, 1]",
        "--tune.release_mults=[0.1, 1.0]", f"--tune.grace_period={args.grace}", f"--tune.reduction_factor={args.rf}",
        f"--tune.out={args.out}", f"--tune.name={scheduler}", "--tune.workers=1", "--log.tensorboard=false",
    ]
    return load_config(args.config, over)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="launch/configs/tune_fmnist.toml")
    p.add_argument("--train-size", type=int, default=2500, help="Fashion-MNIST training subset")
    p.add_argument("--val-size", type=int, default=1000)
    p.add_argument("--test-size", type=int, default=2000)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--grace", type=int, default=2, help="ASHA grace period (epochs)")
    p.add_argument("--rf", type=int, default=3, help="ASHA reduction factor")
    p.add_argument("--out", default="runs/bench_search")
    p.add_argument("--md", help="also write the table here")
    args = p.parse_args()

    runs = {}
    for scheduler in ("fifo", "asha"):
        t0 = time.time()
        summary = run_search(search_config(args, scheduler))
        runs[scheduler] = summary | {"seconds": time.time() - t0}
    rows = {}
    for s in runs:
        with open(Path(runs[s]["search_dir"]) / "results.csv") as f:
            rows[s] = list(csv.DictReader(f))
    ex, asha = runs["fifo"], runs["asha"]
    best_ex, best_asha = ex["best"]["final_val_acc"], asha["best"]["final_val_acc"]
    ex_vals = sorted((float(r["final_val_acc"]) for r in rows["fifo"]), reverse=True)
    rank = 1 + sum(v > best_asha + 1e-9 for v in ex_vals)
    ratio = asha["total_epochs"] / ex["total_epochs"]
    lines = [
        "# Search efficiency: ASHA vs exhaustive search over PST schedules", "",
        f"Fashion-MNIST subset: {args.train_size} training images (poisoned, class-wise 4x4 patch noise 8/255), "
        f"{args.val_size} validation and {args.test_size} test images carved from the test set; ResNet-18 1/4 width; "
        f"{args.epochs} epochs, batch {args.batch_size}; {ex['trials']} schedules (grid: freeze 0.5|1 epoch x unfreeze "
        f"order 0-1|1-0 x release lr multipliers 0.1|1 per release stage); one Ray Train worker (DeepSpeed ZeRO-0) per "
        f"trial, 2 trials at a time on 2 CPU cores. ASHA: grace {args.grace} epochs, reduction factor {args.rf}.", "",
        "| search | trials | training epochs | best final val acc (%) | wall (s) |", "|---|---:|---:|---:|---:|",
        f"| exhaustive (FIFO) | {ex['trials']} | {ex['total_epochs']} | {100 * best_ex:.2f} | {ex['seconds']:.0f} |",
        f"| ASHA | {asha['trials']} | {asha['total_epochs']} | {100 * best_asha:.2f} | {asha['seconds']:.0f} |", "",
        f"- ASHA's pick is {100 * (best_ex - best_asha):.2f} points below the exhaustive best (target <= 1), "
        f"rank {rank} of {len(ex_vals)} in the exhaustive ranking; it used {asha['total_epochs']} / "
        f"{ex['total_epochs']} = **{100 * ratio:.1f} %** of the exhaustive search's training epochs (target <= 40 %).",
        f"- Spread of the exhaustive search's final val accuracies: best {100 * ex_vals[0]:.2f}, median "
        f"{100 * statistics.median(ex_vals):.2f}, worst {100 * ex_vals[-1]:.2f} (how much choosing well matters here).",
        f"- Test accuracy of the two picks (reported, not used for selection): exhaustive "
        f"{100 * ex['best']['final_test_acc']:.2f}, ASHA {100 * asha['best']['final_test_acc']:.2f}.",
        f"- Exhaustive pick: `{json.dumps(ex['best']['params'])}`; ASHA pick: `{json.dumps(asha['best']['params'])}`.",
        "", "![ASHA trials](search_efficiency_asha.png) ![exhaustive trials](search_efficiency_fifo.png)",
        "", f"Regenerate: `.venv/bin/python bench/search_efficiency.py --md {args.md or 'FILE.md'}`",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.md:
        md = Path(args.md)
        for s in runs:  # the two searches' trial curves beside the table
            shutil.copyfile(Path(runs[s]["search_dir"]) / "trials.png", md.with_name(f"{md.stem}_{s}.png"))
        write_atomic(md, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
