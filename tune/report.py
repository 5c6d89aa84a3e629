"""What a search leaves behind: results.csv, results.md, trials.png and best_schedule.toml.

The best schedule is chosen on clean **validation** accuracy at the final epoch (with ``tune.attacks``: the worst
over the attacks), among trials that ran every epoch (an ASHA-stopped trial's early accuracy says nothing about its
end); equal ones by ``tune.ties``; test accuracy is reported beside it, never used.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
import shlex
from pathlib import Path

from pst_dist.config import Config, dump_toml
from pst_dist.io import json_lines, savefig_atomic, write_atomic

from .attacks import extreme, trial_runs, worst_case
from .space import EXTRA, describe, trial_config

COLUMNS = ["trial", "status", "epochs", "epochs_trained", "final_val_acc", "peak_val_acc", "final_test_acc",
           "peak_test_acc", "warm_epochs", "freeze_epochs", "release_epochs", "unfreeze_order", "threshold", "nodes"]


def _curve(metrics_file: Path) -> tuple[list[dict], int]:
    """Per epoch, the last evaluation record of a trial's run (an epoch redone after a restart or a PBT exploit
    counts once), and how many epochs were trained in all (redone ones too)."""
    if not metrics_file.is_file():
        return [], 0
    records = [row for _, row in json_lines(metrics_file)]  # but lines torn by a kill
    evals = [r for r in records if "eval/val_acc" in r]
    last = {int(r["epoch"]): r for r in evals}
    return [last[e] for e in sorted(last)], len(evals)


def trial_curve(cfg: Config, trial_dir: Path) -> tuple[list[dict], int, dict[str, float]]:
    """A trial's evaluation records per epoch, its epochs trained in all, and (multi-attack trials) each attack's
    final validation accuracy. A multi-attack trial's record of an epoch holds the worst validation and test
    accuracy over its attacks (:func:`tune.attacks.worst_case`), for the epochs every attack reached."""
    if not cfg.tune.attacks:
        curve, trained = _curve(trial_dir / "metrics.jsonl")
        return curve, trained, {}
    runs = trial_runs(cfg)
    per = {r: _curve(trial_dir / r / "metrics.jsonl") for r in runs}
    by_epoch = {r: {int(rec["epoch"]): rec for rec in c} for r, (c, _) in per.items()}
    epochs = sorted(set.intersection(*(set(d) for d in by_epoch.values())))
    reports = [worst_case({r: d[e] for r, d in by_epoch.items()}, runs) for e in epochs]
    curve = [{"epoch": e, "eval/val_acc": w["val_acc"], "eval/test_acc": w["test_acc"]}
             for e, w in zip(epochs, reports, strict=True)]
    finals = {f"val_acc_{a}": reports[-1][f"val_acc_{a}"] for a in cfg.tune.attacks} if epochs else {}
    return curve, sum(t for _, t in per.values()), finals


def trial_nodes(run_dir: Path) -> list[str]:
    """The Ray node ids a trial's rank 0 trained on, in order (``nodes.jsonl``, one line per epoch trained: two or
    more ids when it moved, e.g. restored on another node after its node died)."""
    f = run_dir / "nodes.jsonl"
    if not f.is_file():
        return []
    return list(dict.fromkeys(r["node_id"] for _, r in json_lines(f) if "node_id" in r))


def trial_rows(cfg: Config, results, search_dir: Path) -> list[dict]:
    """One row per trial, from the trial's own run directory (metrics.jsonl, written by pst_dist on rank 0)."""
    rows = []
    for r in results:
        m = re.search(r"run_trial_([0-9a-f]+_\d+)_", Path(r.path).name if r.path else "")
        trial = m.group(1) if m else "?"
        curve, trained, finals = trial_curve(cfg, search_dir / "trials" / trial)
        row = {"trial": trial, **describe(r.config), **finals, "epochs_trained": trained,
               "curve_epoch": [int(c["epoch"]) for c in curve], "curve_val": [c["eval/val_acc"] for c in curve],
               "curve_test": [c["eval/test_acc"] for c in curve]}
        if curve:
            row.update(epochs=int(curve[-1]["epoch"]), final_val_acc=curve[-1]["eval/val_acc"],
                       peak_val_acc=peak(row["curve_val"]), final_test_acc=curve[-1]["eval/test_acc"],
                       peak_test_acc=peak(row["curve_test"]))
        else:
            row.update(epochs=0, final_val_acc=math.nan, peak_val_acc=math.nan, final_test_acc=math.nan,
                       peak_test_acc=math.nan)
        row["nodes"] = " > ".join(trial_nodes(search_dir / "trials" / trial))  # in the order it trained on them
        row["status"] = "error" if r.error else ("completed" if row["epochs"] >= cfg.train.epochs else "stopped")
        row["params"] = dict(r.config)
        rows.append(row)
    return sorted(rows, key=lambda x: (-x["final_val_acc"] if x["status"] == "completed" and
                                       not math.isnan(x["final_val_acc"]) else 2, x["trial"]))


def peak(curve: list[float]) -> float:
    """The highest figure of a curve; NaN if any is."""
    return extreme(max, curve)


def best_row(rows: list[dict], ties: str = "order") -> dict | None:
    """The completed trial with the highest objective (``final_val_acc``); among equals, with ``ties`` = clean the
    one with the higher clean validation accuracy (``val_acc_none``), then the first in ``rows`` (trial id order)."""
    done = [r for r in rows if r["status"] == "completed" and not math.isnan(r["final_val_acc"])]
    if not done:
        return None
    if ties == "clean":  # a clean run without a figure loses the tie-break
        return max(done, key=lambda r: (r["final_val_acc"], -math.inf if math.isnan(r["val_acc_none"]) else
                                        r["val_acc_none"]))
    return max(done, key=lambda r: r["final_val_acc"])


def _fmt(key: str, v) -> str:
    if isinstance(v, float):
        return "" if math.isnan(v) else (f"{100 * v:.2f}" if "_acc" in key else f"{v:g}")
    return str(v)


def _columns(rows: list[dict]) -> list[str]:
    mults = sorted({k for r in rows for k in r if k.startswith("mult_")})
    extra = [k for k in EXTRA if any(k in r for r in rows)]
    per_attack = list(dict.fromkeys(k for r in rows for k in r if k.startswith("val_acc_")))
    return COLUMNS + mults + extra + per_attack


def objective(cfg: Config) -> str:
    """The search's objective, in words (results.md, best_schedule.toml)."""
    if cfg.tune.attacks:
        if cfg.tune.seeds:
            return (f"the worst over the attacks {', '.join(cfg.tune.attacks)} of each attack's mean validation "
                    f"accuracy over seeds {cfg.tune.seeds}, at the final epoch (final_val_acc, peak_val_acc and the "
                    f"test columns are that worst case; val_acc_<attack>: each attack's mean over the seeds)")
        return (f"the worst validation accuracy over the attacks {', '.join(cfg.tune.attacks)} at the final epoch "
                f"(final_val_acc, peak_val_acc and the test columns are that worst case; val_acc_<attack>: each "
                f"attack's own)")
    return "clean validation accuracy at the final epoch"


def tie_rule(cfg: Config) -> str:
    """How equal objectives were broken, in words (results.md, best_schedule.toml)."""
    if cfg.tune.ties == "clean":
        return "among equals, the higher clean validation accuracy (val_acc_none), then the first trial id"
    return "among equals, the first trial id"


def results_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=_columns(rows), extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def results_md(cfg: Config, rows: list[dict], best: dict | None, total_epochs: int, unfinished: int = 0,
               best_path: Path | str = "best_schedule.toml") -> str:
    cols = _columns(rows)
    stopped = ([f"**Stopped before its end**: {unfinished} trial(s) unfinished, no best schedule chosen. Continue "
                f"it: `pst-dist tune --config ... --resume` with the same config.", ""] if unfinished else [])
    lines = [f"# PST schedule search `{cfg.tune.name}`", "", *stopped,
             f"search={cfg.tune.search}, scheduler={cfg.tune.scheduler}, {len(rows)} trials, "
             f"{total_epochs} training epochs in all (a full trial is {cfg.train.epochs}"
             f"{f' x {len(cfg.tune.attacks)} attacks' if cfg.tune.attacks else ''}"
             f"{f' x {len(cfg.tune.seeds)} seeds' if cfg.tune.seeds else ''}); "
             f"objective: {objective(cfg)}; {tie_rule(cfg)}; accuracies in %.", "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(c, r.get(c, "")) for c in cols) + " |" for r in rows]
    if best is not None:
        lines += ["", f"Best (validation): trial {best['trial']}, final val {100 * best['final_val_acc']:.2f} %, "
                  f"its test accuracy {100 * best['final_test_acc']:.2f} % (reported, not used). "
                  f"Run it again: `pst-dist train --config {shlex.quote(str(best_path))}`."]
    return "\n".join(lines) + "\n"


def plot_trials(rows: list[dict], best: dict | None, path: Path, multi: bool = False) -> None:
    import matplotlib  # matplotlib: start-up time, only when plotting

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # matplotlib: start-up time, only when plotting

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharex=True)
    for r in rows:
        if not r["curve_epoch"]:
            continue
        is_best = best is not None and r["trial"] == best["trial"]
        kw = dict(lw=2.5, color="C3", zorder=3, label=f"best {r['trial']}") if is_best else dict(lw=1, alpha=0.6)
        axes[0].plot(r["curve_epoch"], [100 * v for v in r["curve_val"]], marker="o", ms=3, **kw)
        axes[1].plot(r["curve_epoch"], [100 * v for v in r["curve_test"]], marker="o", ms=3, **kw)
    worst = "worst over attacks: " if multi else ""
    axes[0].set_title(f"{worst}clean validation accuracy (the objective)")
    axes[1].set_title(f"{worst}clean test accuracy (reported only)")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.set_ylabel("%")
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)  # epochs, as report's and diagnose's plots
    if best is not None:
        axes[0].legend(loc="lower right")
    fig.tight_layout()
    savefig_atomic(fig, path, dpi=110)
    plt.close(fig)


BEST_HEADER = "# Best schedule of the search "
"""How :func:`best_schedule_toml` begins: a file that does is one a search wrote."""


def is_best_schedule(path: Path) -> bool:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read(len(BEST_HEADER)) == BEST_HEADER
    except (OSError, UnicodeDecodeError):
        return False


def best_schedule_toml(cfg: Config, best: dict, path: Path | str = "best_schedule.toml") -> str:
    """The best trial's config, as a recipe to train (``path``: where it is written, for the commands it gives)."""
    out = trial_config(cfg, best["params"])  # a copy of the base config
    here = shlex.quote(str(path))
    out.log.run_dir = f"runs/{cfg.tune.name}_best"
    header = (f"{BEST_HEADER}{cfg.tune.name!r} (trial {best['trial']}), chosen on "
              f"{objective(cfg)}: {100 * best['final_val_acc']:.2f} %.\n"
              f"# Ties: {tie_rule(cfg)} (tune.ties = {cfg.tune.ties!r}).\n"
              f"# Search parameters: {json.dumps(best['params'])}\n"
              + (f"# PBT: these are the trial's settings at its end. It trained under others before (each exploit "
                 f"copied another trial's settings and weights: its run's meta.json 'resumes' lists them), so "
                 f"training this schedule from the start is a new run, not a reproduction of the "
                 f"{100 * best['final_val_acc']:.2f} %.\n" if cfg.tune.scheduler == "pbt" else "")
              + f"# Run it: pst-dist train --config {here}"
              + (f"; on every attack, a held-out one too: pst-dist bench --config {here}"
                 if cfg.tune.attacks else "")
              + f"\n# (its log.run_dir, {out.log.run_dir!r}, is relative to where you run it)\n\n")
    return header + dump_toml(out)


REPORTS = ("results.csv", "results.md", "trials.png", "best_schedule.toml")
"""What :func:`write_reports` writes into the search directory, over what is there."""


def write_reports(cfg: Config, results, search_dir: Path, log, unfinished: int = 0) -> dict:
    """The reports of a search; ``unfinished``: its trials that neither ended nor failed (the search was stopped,
    e.g. by Ctrl-C). A stopped search's tables say so and name no best schedule: a partial search chose none."""
    rows = trial_rows(cfg, results, search_dir)
    best = None if unfinished else best_row(rows, cfg.tune.ties)
    total = sum(r["epochs_trained"] for r in rows)
    search_dir.mkdir(parents=True, exist_ok=True)
    csv_name, md_name, png_name, best_name = REPORTS  # the names search.py checks before it writes over them
    write_atomic(search_dir / csv_name, results_csv(rows))
    md = results_md(cfg, rows, best, total, unfinished, search_dir / best_name)
    write_atomic(search_dir / md_name, md)
    plot_trials(rows, best, search_dir / png_name, multi=bool(cfg.tune.attacks))
    if best is not None:
        write_atomic(search_dir / best_name, best_schedule_toml(cfg, best, search_dir / best_name))
    elif unfinished and is_best_schedule(search_dir / best_name):  # from the search before this resume: stale now
        (search_dir / best_name).unlink()
    log(md)
    errors = [r["trial"] for r in rows if r["status"] == "error"]
    none = (f" (stopped with {unfinished} trial(s) unfinished: no best schedule; continue it with --resume)"
            if unfinished else " (no trial completed: no best schedule)")
    log(f"[tune] wrote {search_dir}/{csv_name}, {md_name}, {png_name}" + (f", {best_name}" if best else none)
        + (f"; trials that failed: {errors}" if errors else ""))
    return {"trials": len(rows), "unfinished": unfinished, "total_epochs": total, "errors": errors,
            "best": None if best is None else {k: best[k] for k in ("trial", "final_val_acc", "final_test_acc",
                                                                    "params")},
            "search_dir": str(search_dir)}
