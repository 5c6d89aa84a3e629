"""Choose a recipe's test-time views (``schedule.eval_views``) on a finished ``pst-dist tune`` search over attacks,
from *validation* accuracy only: every trial's final checkpoint of every attack is scored with each candidate list of
views (the weights are the search's; nothing is trained, nothing is written), and the (trial, views) pair with the
highest worst-case validation accuracy over the search's attacks wins (ties: fewer views, then the search's order;
with ``--ties clean``: the higher validation accuracy on the clean data, attack ``none``, first).
The search's held-out attack was never trained, so it plays no part here either.

    python launch/select_eval_views.py runs/tune/fmnist_attacks_len \\
        --views '[[], ["blur:0.5"], ["blur:0.7"], ["blur:1"]]'

Prints a markdown table (one row per trial and views: validation accuracy % per attack, its mean over the search's
seeds with tune.seeds, and the worst) and the pick.
The rows with the views the search trained with (its config's ``schedule.eval_views``; ``[]`` unless set) reproduce
each run's own final validation accuracy (its summary.json; checked: a mismatch stops it)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pst_dist.cli import run_script  # noqa: E402
from pst_dist.config import ConfigError, ScheduleConfig  # noqa: E402
from pst_dist.data.pipeline import build_data  # noqa: E402
from pst_dist.evaluate import clean, load_run_model, recorded_config  # noqa: E402
from pst_dist.io import read_json  # noqa: E402
from tune.attacks import attack_means, trial_runs  # noqa: E402


def search_trials(search: Path) -> tuple[dict[str, dict[str, Path]], dict[str, tuple[str, int | None]]]:
    """({trial: {run: run dir}}, {run: (attack, seed)}) of the search's multi-attack trials, laid out as its recorded
    config says (tune.attacks, tune.seeds: ``<search>/trials/<trial>/<attack>[/seed<s>]``); a trial that has some of
    those runs but not all stops it (its worst case would be over fewer runs)."""
    trials = sorted(t for t in (search / "trials").glob("*") if t.is_dir())
    first = next((c.parent for t in trials for c in sorted(t.glob("**/config.toml"))), None)
    runs = trial_runs(recorded_config(first)) if first is not None else {}
    if not runs:
        sys.exit(f"{search}: no trials/<trial>/<attack>/config.toml of a search over attacks (tune.attacks); not a "
                 f"finished search over attacks")
    out = {}
    for t in trials:
        have = {r: t / r for r in runs if (t / r / "config.toml").is_file()}
        if have and len(have) < len(runs):
            sys.exit(f"{t}: no run of {sorted(set(runs) - set(have))}; the trial did not finish")
        if have:
            out[t.name] = have
    return out, runs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("search", type=Path, help="a finished search's directory (tune.out / tune.name)")
    ap.add_argument("--views", default='[[], ["blur:0.7"]]', help="JSON list of candidate eval_views lists")
    ap.add_argument("--ties", choices=("order", "clean"), default="order",
                    help="equal worst cases: fewer views, then the search's order (order), or first the higher "
                         "clean validation accuracy, attack none (clean; the issue's other criterion, the cost of PST "
                         "on clean data)")
    args = ap.parse_args()
    try:
        candidates = [ScheduleConfig(eval_views=v).eval_views for v in json.loads(args.views)]
    except (ValueError, TypeError, ConfigError) as e:
        sys.exit(f"--views {args.views!r}: {e}")
    if not candidates:
        sys.exit(f"--views {args.views!r}: no candidate views to choose from")
    torch.set_num_threads(2)
    (trials, runs), cpu = search_trials(args.search), torch.device("cpu")
    attacks = list(dict.fromkeys(a for a, _ in runs.values()))
    if args.ties == "clean" and "none" not in attacks:
        sys.exit(f"--ties clean: the search has no clean run (attack none); its attacks: {attacks}")
    print("| trial | eval_views | " + " | ".join(attacks) + " | **worst** |\n|---|---|" + "---:|" * (len(attacks) + 1))
    data, best = None, None
    for trial, dirs in trials.items():
        models, finals = {}, {}
        for name, run in dirs.items():
            cfg = recorded_config(run)
            data = data or build_data(clean(cfg))  # every run of a search evaluates on the same clean splits
            models[name] = load_run_model(run, own_data=data, cfg=cfg)
            finals[name] = read_json(run / "summary.json", "the run's summary.json").get("final_val_acc")
        for views in candidates:
            per: dict[str, float] = {}  # run: its validation accuracy %
            for run, rm in models.items():
                acc = rm.accuracy(data.splits.val, cpu, views=views)
                want = finals[run]
                if views == rm.cfg.schedule.eval_views and want is not None and acc != want:
                    sys.exit(f"{trial} / {run}: validation {100 * acc:.2f} here, {100 * want:.2f} in the run's "
                             f"summary.json: not the search's data or checkpoint")
                per[run] = 100 * acc
            accs = attack_means(per, runs)  # the search's objective: each attack's mean over its seeds
            worst = min(accs.values())
            print(f"| {trial} | `{json.dumps(views)}` | " + " | ".join(f"{accs[a]:.2f}" for a in attacks)
                  + f" | **{worst:.2f}** |", flush=True)
            key = (worst, accs["none"] if args.ties == "clean" else 0.0, -len(views))
            if best is None or key > best[0]:
                best = (key, trial, views)
    (worst, *_), trial, views = best
    print(f"\nPick (validation worst case {worst:.2f} %): trial {trial}, schedule.eval_views = {json.dumps(views)}")


if __name__ == "__main__":
    sys.exit(run_script("select_eval_views.py", main))
