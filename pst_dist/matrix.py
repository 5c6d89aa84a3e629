"""``pst-dist bench``: the attack x defense matrix over seeds (the speed benchmarks are the repository's bench/).

Every attack is generated once per seed on the recipe's training split and cached losslessly under
``<out>/poisons/<attack>_seed<k>/``: a poison store as ``pst-dist poison`` writes it (:mod:`pst_dist.poison.store`;
uint8 .npy + poison.json with parameters, measured norms, generation time and hashes), of the split's images only
(with their source indices), which the cells read as ``poison.kind = "file"`` does and which trains that way too.
Every (attack, defense, seed) cell is one training run with its own run directory (TensorBoard, metrics, summary)
under ``<out>/cells/``; a cell whose summary.json exists is skipped, a cell with a checkpoint (of its engine: torch
or DeepSpeed) resumes from it.
``early_stop`` is read off the ``standard`` run (test accuracy at the epoch of peak clean validation accuracy: the
model early stopping would return), so it costs nothing. Results: ``results.csv``, ``results.md`` (final-epoch and
peak clean test accuracy, mean +- std over seeds, plus generation times), ``heatmap.png``.
"""

from __future__ import annotations

import copy
import csv
import io
import json
import os
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, replace
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .config import Config, ConfigError, apply_overrides, from_dict, load_config, to_dict
from .data.pipeline import build_data
from .data.sources import Split, fingerprint, load_splits
from .engine import engine_class
from .io import atomic_dir, savefig_atomic, write_atomic
from .poison import PoisonFileError, make_poison, norms, store
from .registry import DEFENSES
from .report import mean_std
from .train import train

STANDARD = [{"name": "standard"}]


def run_of(defense: str) -> tuple[str, list[str]]:
    """(the run it is read from, the config overrides of that run): :data:`pst_dist.registry.DEFENSES`."""
    d = DEFENSES.entry(defense).data
    return d["run"], list(d["overrides"])


def _cfg(base: dict, overrides: list[str]) -> Config:
    return from_dict(Config, apply_overrides(copy.deepcopy(base), overrides))


def poison_cfg(base: dict, attack: str, seed: int) -> Config:
    extra = list(base["bench"]["attack_overrides"].get(attack, []))
    return _cfg(base, [f'poison.kind="{attack}"', f"poison.seed={seed}", f"train.seed={seed}", *extra])


def cell_cfg(base: dict, attack: str, run: str, seed: int, out: Path) -> Config:
    _, over = run_of(run)
    b = base["bench"]
    cfg = _cfg(base, [f'poison.kind="{attack}"', f"poison.seed={seed}", f"train.seed={seed}", *over,
                      *b["defense_overrides"].get(run, []), *b["attack_overrides"].get(attack, [])])
    cfg.log.run_dir = str(out / "cells" / attack / run / f"seed{seed}")
    cfg.log.progress = False
    return cfg


# ---------------------------------------------------------------- work done in pool processes

def _threads(n: int) -> None:
    torch.set_num_threads(max(1, n))


def generate_poison(base: dict, attack: str, seed: int, path: str, threads: int) -> dict:
    """Generate one attack on the cells' training split and store it at ``path`` (a poison store of that split's
    images, :func:`pst_dist.poison.store.fill`; atomic directory rename, an earlier one replaced)."""
    _threads(threads)
    cfg = poison_cfg(base, attack, seed)
    splits = load_splits(cfg.data)
    tr = splits.train
    t0 = time.time()
    poisoned, info = make_poison(tr.images, tr.labels, tr.index, splits.source_train_size, cfg.poison,
                                 splits.num_classes, full=cfg)
    seconds = time.time() - t0
    order = torch.argsort(tr.index)  # the store's order: the source's
    meta = {"format": store.FORMAT, "attack": attack, "parameters": asdict(cfg.poison), "seed": seed,
            "source": cfg.data.source,
            "fingerprint": {"clean_train_sha256": fingerprint(Split(tr.images[order], tr.labels[order],
                                                                    tr.index[order]))},
            "norms": norms(tr.images, poisoned), "seconds": round(seconds, 2), "model_based": info,
            "model": asdict(cfg.model)}
    with atomic_dir(Path(path), replace=True) as tmp:  # the cache is the bench's own
        store.fill(tmp, poisoned, meta, rows=tr.index, source_size=splits.source_train_size)
    return meta


def cell_data_cfg(cfg: Config, poison_dir: str | None) -> Config:
    """The config a cell's data is built with: its cached poison read as ``poison.kind = "file"`` reads a store
    (checked against its hashes, budget and norms); the cell's own config (recorded in its run) names the attack."""
    if poison_dir is None:
        return cfg
    read = copy.deepcopy(cfg)
    read.poison = replace(read.poison, kind="file", path=str(poison_dir))
    return read


def run_cell(base: dict, attack: str, run: str, seed: int, out: str, poison_dir: str | None, threads: int) -> dict:
    """Train one cell on its cached poison (``poison_dir``; None for attack none), resuming from its checkpoint
    when an interrupted run left one (the engine's: :meth:`pst_dist.engine.Engine.has_checkpoint`)."""
    _threads(threads)
    cfg = cell_cfg(base, attack, run, seed, Path(out))
    cfg.train.threads = max(1, threads)
    run_dir = Path(cfg.log.run_dir)
    resume = engine_class(cfg).has_checkpoint(run_dir) and not _failed(run_dir)
    t0 = time.time()
    data = build_data(cell_data_cfg(cfg, poison_dir))
    # the cell's directory is the bench's own: an interrupted cell resumes, a failed or half-begun one starts over
    summary = train(cfg, resume=resume, data=data, overwrite=not resume)
    return {"attack": attack, "run": run, "seed": seed, "seconds": round(time.time() - t0, 1), "resumed": resume,
            **{k: summary[k] for k in ("final_test_acc", "peak_test_acc", "test_acc_at_best_val", "final_val_acc")}}


# ---------------------------------------------------------------- the driver

def _recipe(cfg: Config) -> dict[str, object]:
    """The settings a cell's result depends on, flattened to dotted keys, list items by index (not [bench], [log]
    or thread counts)."""
    d = to_dict(cfg)
    for section in ("bench", "log"):
        d.pop(section, None)
    d["train"].pop("threads", None)
    flat: dict[str, object] = {}

    def walk(prefix: str, v: object) -> None:
        if isinstance(v, dict):
            for k, x in v.items():
                walk(f"{prefix}.{k}" if prefix else k, x)
        elif isinstance(v, list) and v and isinstance(v[0], dict):  # e.g. schedule.stages.0.loss.view
            for i, x in enumerate(v):
                walk(f"{prefix}.{i}", x)
        else:
            flat[prefix] = v

    walk("", d)
    return flat


def recipe_change(run_dir: Path, cfg: Config) -> dict[str, tuple]:
    """{key: (recorded, now)} where the cell already begun in ``run_dir`` ran another recipe than ``cfg``; empty
    when there is no such cell or nothing that matters changed."""
    f = run_dir / "config.toml"
    if not f.is_file():
        return {}
    try:
        was = _recipe(load_config(f))
    except ConfigError as e:  # a config this version cannot read counts as changed
        return {"config.toml": (str(e), "this version's")}
    return changes(was, _recipe(cfg))


def changes(was: dict, now: dict) -> dict[str, tuple]:
    """{key: (was, now)} for every key whose value differs (missing counts as None)."""
    return {k: (was.get(k), now.get(k)) for k in sorted(set(was) | set(now)) if was.get(k) != now.get(k)}


def _failed(run_dir: Path) -> bool:
    """Whether the run in ``run_dir`` ended as failed (diverged): it is run again, not reported."""
    f = run_dir / "summary.json"
    try:
        return f.is_file() and json.loads(f.read_text()).get("status", "finished") != "finished"
    except (OSError, ValueError):
        return True


def runs_needed(defenses: list[str]) -> list[str]:
    runs: list[str] = []
    for d in defenses:
        r = run_of(d)[0]
        if r not in runs:
            runs.append(r)
    return runs


@dataclass
class Bench:
    """One ``pst-dist bench`` invocation: its validated config and what follows from it."""

    config: str
    overrides: list[str]
    cfg: Config
    base: dict  # the resolved config as a dict (what the pool processes rebuild each cell's config from)
    seeds: list[int]
    runs: list[str]  # the training runs the defenses are read from
    jobs: int
    threads: int

    @property
    def out(self) -> Path:
        return Path(self.cfg.bench.out)

    @property
    def command(self) -> str:
        return " ".join(["pst-dist bench --config", self.config, *(shlex.quote(o) for o in self.overrides)])

    @property
    def cells(self) -> list[tuple[str, str, int]]:
        return [(a, r, s) for s in self.seeds for a in self.cfg.bench.attacks for r in self.runs]

    def poison_dir(self, attack: str, seed: int) -> Path:
        return self.out / "poisons" / f"{attack}_seed{seed}"


def plan_bench(config: str, overrides: list[str]) -> Bench:
    """Validate everything once, before any work (nothing is written for a bad config)."""
    cfg = load_config(config, overrides)
    b = cfg.bench
    base = to_dict(cfg)
    if "pst" in b.defenses and len(cfg.schedule.stages) < 2:
        raise ConfigError(f"bench.defenses has 'pst' but the recipe's [schedule] has {len(cfg.schedule.stages)} "
                          f"stage(s): give the PST schedule in the recipe")
    for a in b.attacks:  # each attack's own overrides must make a valid config
        poison_cfg(base, a, 0)
    jobs = max(1, b.jobs)
    threads = max(1, (os.cpu_count() or 1) // jobs) if not cfg.train.threads else cfg.train.threads
    return Bench(config, overrides, cfg, base, list(range(b.seeds)), runs_needed(b.defenses), jobs, threads)


def cached_poisons(bench: Bench) -> tuple[dict[tuple[str, int], dict], list[tuple[str, int, Path]]]:
    """({(attack, seed): poison.json} of the poisons already cached, [(attack, seed, dir)] of those to make). A cached
    poison made with other settings, or not a store this version reads, is refused (ConfigError)."""
    gen: dict[tuple[str, int], dict] = {}
    todo: list[tuple[str, int, Path]] = []
    for a in bench.cfg.bench.attacks:
        for s in bench.seeds:
            pdir = bench.poison_dir(a, s)
            if a == "none":
                continue
            if not (pdir / store.META).is_file():
                todo.append((a, s, pdir))
                continue
            try:
                meta = store.read_meta(pdir)
            except PoisonFileError as e:  # e.g. cached by an earlier version (its own format): not reused
                raise ConfigError(f"{pdir} is not a poison store this version reads ({e}); remove it or choose "
                                  f"another bench.out") from None
            want = asdict(poison_cfg(bench.base, a, s).poison)
            if diff := changes(meta["parameters"], want):  # a resumed bench must not reuse a poison made with
                # other settings
                raise ConfigError(f"{pdir} was made with other poison settings (cached, now): {diff}; remove it "
                                  f"or choose another bench.out")
            gen[(a, s)] = meta
    return gen, todo


def finished_cells(bench: Bench, say: Callable[[str], None]) -> tuple[dict[tuple[str, str, int], dict],
                                                                       list[tuple[str, str, int]]]:
    """({cell: result} of the cells already finished, [cells] to run). A cell run (or begun) with another recipe
    is moved to ``<out>/superseded/`` and run again; a failed one is run again."""
    done: dict[tuple[str, str, int], dict] = {}
    todo: list[tuple[str, str, int]] = []
    for a, r, s in bench.cells:
        ccfg = cell_cfg(bench.base, a, r, s, bench.out)
        run_dir = Path(ccfg.log.run_dir)
        changed = recipe_change(run_dir, ccfg)
        if changed:  # a cell run (or begun) with another recipe is run again from scratch; the old run is kept
            old = bench.out / "superseded" / a / r / f"seed{s}-{time.strftime('%Y%m%d-%H%M%S')}"
            old.parent.mkdir(parents=True, exist_ok=True)
            run_dir.rename(old)
            say(f"cell {a} / {r} / seed {s}: its recipe changed (was, now: {changed}); running it again, the old "
                f"run moved to {old}")
        f = run_dir / "summary.json"
        if f.is_file() and not _failed(run_dir):
            sm = json.loads(f.read_text())
            done[(a, r, s)] = {"attack": a, "run": r, "seed": s, "seconds": None, "resumed": False,
                               **{k: sm[k] for k in ("final_test_acc", "peak_test_acc", "test_acc_at_best_val",
                                                     "final_val_acc")}}
        else:
            todo.append((a, r, s))
    return done, todo


def run_pool(bench: Bench, gen: dict, todo_p: list, done: dict, todo_c: list, say: Callable[[str], None]) -> list[str]:
    """Make the missing poisons and run the cells in ``bench.jobs`` processes, each cell as soon as its poison is
    there, the costliest first; ``gen`` and ``done`` fill in as they finish, and the results are rewritten after
    each. Returns the errors (a failed poison or cell does not stop the others)."""
    b = bench.cfg.bench
    # the costliest runs first, so the two workers finish together
    cost = {"adv": 0, "pst": 1}
    waiting = sorted(todo_c, key=lambda c: (cost.get(c[1], 2), c[2]))
    errors: list[str] = []
    bar = tqdm(total=len(todo_p) + len(todo_c), desc="bench", file=sys.stderr)
    out, threads = bench.out, bench.threads
    with ProcessPoolExecutor(max_workers=bench.jobs, mp_context=get_context("spawn")) as pool:
        pending = {pool.submit(generate_poison, bench.base, a, s, str(p), threads): ("poison", a, s)
                   for a, s, p in todo_p}

        def submit_ready():
            for c in list(waiting):
                a, r, s = c
                if a == "none" or (a, s) in gen:
                    pdir = None if a == "none" else str(bench.poison_dir(a, s))
                    pending[pool.submit(run_cell, bench.base, a, r, s, str(out), pdir, threads)] = ("cell", a, r, s)
                    waiting.remove(c)

        submit_ready()
        while pending:
            fin, _ = wait(list(pending), return_when=FIRST_COMPLETED)
            for f in fin:
                what = pending.pop(f)
                bar.update(1)
                try:
                    res = f.result()
                except Exception as e:  # noqa: BLE001 - one failed cell must not lose the others
                    errors.append(f"{what}: {type(e).__name__}: {e}")
                    say(f"FAILED {what}: {type(e).__name__}: {e}")
                    if what[0] == "poison":  # its cells cannot run
                        waiting[:] = [c for c in waiting if (c[0], c[2]) != (what[1], what[2])]
                    continue
                if what[0] == "poison":
                    gen[(what[1], what[2])] = res
                    say(f"poison {what[1]} seed {what[2]}: {res['seconds']:.1f} s, Linf "
                        f"{res['norms']['linf'] * 255:.0f}/255, L2 {res['norms']['l2_mean']:.3f}, L0 "
                        f"{res['norms']['l0_mean']:.0f}" + (f", {res['model_based']}" if res['model_based'] else ""))
                    submit_ready()
                else:
                    done[what[1:]] = res
                    say(f"cell {what[1]} / {what[2]} / seed {what[3]}: final {100 * res['final_test_acc']:.1f}, peak "
                        f"{100 * res['peak_test_acc']:.1f} ({res['seconds']:.0f} s"
                        + (", resumed from its checkpoint)" if res["resumed"] else ")"))
            write_results(out, b.attacks, b.defenses, bench.seeds, done, gen, bench.command)
    bar.close()
    return errors


def run_bench(config: str, overrides: list[str]) -> dict:
    bench = plan_bench(config, overrides)
    b, out = bench.cfg.bench, bench.out
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "bench.json", json.dumps({"config": config, "overrides": overrides, "resolved": bench.base},
                                                indent=2))
    say = lambda m: tqdm.write(f"[bench] {m}", file=sys.stderr)
    say(f"{len(b.attacks)} attacks x {len(b.defenses)} defenses ({len(bench.runs)} training runs each: "
        f"{', '.join(bench.runs)}) x {len(bench.seeds)} seeds; {bench.jobs} job(s) x {bench.threads} thread(s); "
        f"out {out}")
    t_start = time.time()
    gen, todo_p = cached_poisons(bench)
    done, todo_c = finished_cells(bench, say)
    say(f"poisons: {len(gen)} cached, {len(todo_p)} to make; cells: {len(done)} finished (skipped), "
        f"{len(todo_c)} to run")
    errors = run_pool(bench, gen, todo_p, done, todo_c, say)
    table = write_results(out, b.attacks, b.defenses, bench.seeds, done, gen, bench.command)
    print(table)
    say(f"{len(done)} of {len(bench.cells)} cells finished, {len(errors)} failed; {time.time() - t_start:.0f} s; "
        f"wrote {out / 'results.csv'}, {out / 'results.md'}, {out / 'heatmap.png'}; TensorBoard: tensorboard "
        f"--logdir {out / 'cells'}")
    return {"done": len(done), "cells": len(bench.cells), "errors": errors}


def cell_value(done: dict, attack: str, defense: str, seed: int) -> tuple[float, float, float | None] | None:
    """(final, peak) clean test accuracy of one cell and its final validation accuracy (what schedules are chosen
    on); early_stop: the standard run's test accuracy at its best validation epoch, as both, and no validation
    figure."""
    run = run_of(defense)[0]
    r = done.get((attack, run, seed))
    if r is None:
        return None
    if defense == "early_stop":
        return r["test_acc_at_best_val"], r["test_acc_at_best_val"], None
    return r["final_test_acc"], r["peak_test_acc"], r["final_val_acc"]



def write_results(out: Path, attacks: list[str], defenses: list[str], seeds: list[int], done: dict, gen: dict,
                  command: str = "") -> str:
    rows = []
    for a in attacks:
        for d in defenses:
            for s in seeds:
                v = cell_value(done, a, d, s)
                if v is not None:
                    rows.append({"attack": a, "defense": d, "seed": s, "final_test_acc": round(v[0], 5),
                                 "peak_test_acc": round(v[1], 5), "final_val_acc": "" if v[2] is None else
                                 round(v[2], 5)})
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=["attack", "defense", "seed", "final_test_acc", "peak_test_acc",
                                        "final_val_acc"])
    w.writeheader()
    w.writerows(rows)
    write_atomic(out / "results.csv", buf.getvalue())

    def vals(a, d, i):
        return [v[i] for s in seeds if (v := cell_value(done, a, d, s)) is not None]

    lines = ([f"Regenerate: `{command}`", ""] if command else []) + [
             "Clean test accuracy (%), mean ± std over seeds: **final epoch** / peak over epochs "
             "(early_stop: the epoch of peak clean validation accuracy, both).", "",
             "| attack | " + " | ".join(defenses) + " |", "|---|" + "---:|" * len(defenses)]
    for a in attacks:
        cells = []
        for d in defenses:
            n = len(vals(a, d, 0))
            cells.append(f"**{mean_std(vals(a, d, 0))}** / {mean_std(vals(a, d, 1))}"
                         + (f" (n={n})" if n != len(seeds) else ""))
        lines.append(f"| {a} | " + " | ".join(cells) + " |")
    if "pst" in defenses:
        lines += ["", _verdicts(attacks, defenses, vals)]
    if gen:
        lines += ["", "Poison generation on the training split (seconds per seed; measured norms in [0, 1] units):", "",
                  "| attack | seconds | L-inf | L2 mean | L0 mean | surrogate (first seed) |",
                  "|---|---:|---:|---:|---:|---|"]
        for a in attacks:
            ms = [gen[(a, s)] for s in seeds if (a, s) in gen]
            if not ms:
                continue
            secs = ", ".join(f"{m['seconds']:.1f}" for m in ms)
            n = ms[0]["norms"]
            mb = ms[0].get("model_based") or {}
            info = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in mb.items()
                             if k not in ("attack", "seconds"))
            lines.append(f"| {a} | {secs} | {n['linf'] * 255:.0f}/255 | {n['l2_mean']:.3f} | {n['l0_mean']:.0f} | "
                         f"{info or '—'} |")
    table = "\n".join(lines)
    write_atomic(out / "results.md", table + "\n")
    _heatmap(out / "heatmap.png", attacks, defenses, vals)
    return table


def _verdicts(attacks, defenses, vals) -> str:
    """The acceptance questions, answered from the table: does standard training collapse; is PST >= JPEG-10 and
    >= 80 % at the final epoch."""
    out = []
    mean = lambda xs: statistics.mean(xs) if xs else None
    ge_jpeg = [a for a in attacks if "jpeg10" in defenses and mean(vals(a, "pst", 0)) is not None
               and mean(vals(a, "jpeg10", 0)) is not None and mean(vals(a, "pst", 0)) >= mean(vals(a, "jpeg10", 0))]
    ge80 = [a for a in attacks if (m := mean(vals(a, "pst", 0))) is not None and m >= 0.80]
    poisoned = [a for a in attacks if a != "none"]
    if "jpeg10" in defenses:
        out.append(f"- PST final >= JPEG-10 final on {len([a for a in ge_jpeg if a != 'none'])} of {len(poisoned)} "
                   f"attacks ({', '.join(a for a in ge_jpeg if a != 'none') or 'none'}).")
    out.append(f"- PST final >= 80 % on {len([a for a in ge80 if a != 'none'])} of {len(poisoned)} attacks "
               f"(below: {', '.join(a for a in poisoned if a not in ge80) or 'none'}).")
    if "standard" in defenses:
        std = {a: mean(vals(a, "standard", 0)) for a in attacks}
        out.append("- Standard training, final: " + ", ".join(f"{a} {100 * v:.1f}" for a, v in std.items()
                                                               if v is not None) + ".")
    return "\n".join(out)


def _heatmap(path: Path, attacks, defenses, vals) -> None:
    import matplotlib  # matplotlib: start-up time, only when plotting

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # matplotlib: start-up time, only when plotting

    m = np.full((len(attacks), len(defenses)), np.nan)
    for i, a in enumerate(attacks):
        for j, d in enumerate(defenses):
            xs = vals(a, d, 0)
            if xs:
                m[i, j] = 100 * statistics.mean(xs)
    fig, ax = plt.subplots(figsize=(1.0 * len(defenses) + 2.6, 0.42 * len(attacks) + 1.5), dpi=90)
    im = ax.imshow(m, vmin=0, vmax=100, cmap="viridis", aspect="auto")
    for i in range(len(attacks)):
        for j in range(len(defenses)):
            if not np.isnan(m[i, j]):
                ax.text(j, i, f"{m[i, j]:.1f}", ha="center", va="center", fontsize=8,
                        color="white" if m[i, j] < 60 else "black")
    ax.set_xticks(range(len(defenses)), defenses, rotation=30, ha="right")
    ax.set_yticks(range(len(attacks)), attacks)
    ax.set_title("final-epoch clean test accuracy (%), mean over seeds", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.03)
    fig.tight_layout()
    savefig_atomic(fig, path)
    plt.close(fig)
