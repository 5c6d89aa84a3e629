"""``pst-dist bench``: the attack x defense matrix over seeds (the speed benchmarks are the repository's bench/).

Every attack is generated once per seed on the recipe's training split and cached losslessly under
``<out>/poisons/<attack>_seed<k>/``: a poison store as ``pst-dist poison`` writes it (:mod:`pst_dist.poison.store`;
uint8 .npy + poison.json with parameters, measured norms, generation time, hashes and the machine's kernel choice),
of the split's images only (with their source indices), which the cells read as ``poison.kind = "file"`` does and
which trains that way too.
Every (attack, defense, seed) cell is one training run with its own run directory (TensorBoard, metrics, summary)
under ``<out>/cells/``; a cell whose summary.json exists is skipped, a cell with a checkpoint (of its engine: torch
or DeepSpeed) resumes from it.
``early_stop`` is read off the ``standard`` run (test accuracy at the epoch of peak clean validation accuracy: the
model early stopping would return), so it costs nothing. Results: ``results.csv``, ``results.md`` (final-epoch and
peak clean test accuracy, mean +- std over seeds, plus generation times), ``heatmap.png``.

Where the work runs (``bench.runner``): ``pool``, a process pool on this machine (``bench.jobs`` processes); ``ray``,
each poison and cell a Ray task (:class:`RayRunner`) asking for ``bench.cpus_per_cell`` CPUs and, where cells train
on GPUs, ``bench.gpus_per_cell`` GPUs (Ray gives each task its own: CUDA_VISIBLE_DEVICES), on the cluster
``RAY_ADDRESS`` names or else on a local Ray this command starts and stops. Both run the same functions
(:func:`generate_poison`, :func:`run_cell`) with the same seeds, so their results are the same. On a cluster the tasks
write into ``bench.out`` and read the recipe's data paths on whichever node they land: give ``bench.out`` as a
directory every node sees (NFS or the like) and data paths that every node resolves alike.
"""

from __future__ import annotations

import copy
import csv
import io
import json
import math
import os
import shlex
import statistics
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, replace
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .config import (
    Config,
    ConfigError,
    ModelConfig,
    PoisonConfig,
    absolute_paths,
    apply_overrides,
    auto_meaning,
    device_type,
    from_dict,
    load_config,
    to_dict,
)
from .data.pipeline import build_data, poison_meta
from .data.sources import Split, check_val_size, load_splits
from .distributed import init_ray
from .engine import engine_class
from .io import OutputError, atomic_dir, check_written_over, die_with_parent, savefig_atomic, write_atomic
from .metrics import computed_on, describe_machine, run_machines
from .models import count_groups
from .poison import PoisonFileError, make_poison, store
from .pst.schedule import check_stages
from .registry import ATTACKS, DEFENSES
from .report import TABLE_KEYS, mean_std, summary_problem
from .rundir import resumed_inputs, trained_on
from .train import train

STANDARD = [{"name": "standard"}]


def run_of(defense: str) -> tuple[str, list[str]]:
    """(the run it is read from, the config overrides of that run): :data:`pst_dist.registry.DEFENSES`."""
    d = DEFENSES.entry(defense).data
    return d["run"], list(d["overrides"])


def with_overrides(base: dict, overrides: list[str]) -> Config:
    """The config ``base`` (a dict, left as it is) with ``overrides`` applied."""
    return from_dict(Config, apply_overrides(copy.deepcopy(base), overrides))


def poison_cfg(base: dict, attack: str, seed: int | None) -> Config:
    """The recipe ``base`` with the attack's poison settings: the attack, seed ``seed`` (``poison.seed`` and
    ``train.seed``; None: the recipe's own) and its ``[bench.attack_overrides]``."""
    seeds = [] if seed is None else [f"poison.seed={seed}", f"train.seed={seed}"]
    extra = list(base["bench"]["attack_overrides"].get(attack, []))
    return with_overrides(base, [f'poison.kind="{attack}"', *seeds, *extra])


def cell_cfg(base: dict, attack: str, run: str, seed: int, out: Path) -> Config:
    _, over = run_of(run)
    b = base["bench"]
    cfg = with_overrides(base, [f'poison.kind="{attack}"', f"poison.seed={seed}", f"train.seed={seed}", *over,
                      *b["defense_overrides"].get(run, []), *b["attack_overrides"].get(attack, [])])
    cfg.log.run_dir = str(out / "cells" / attack / run / f"seed{seed}")
    cfg.log.progress = False
    return cfg


# ---------------------------------------------------------------- work done in pool processes or Ray tasks

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
    clean, poisoned = Split(tr.images[order], tr.labels[order], tr.index[order]), poisoned[order]
    meta = poison_meta(cfg, clean, poisoned, info, seconds)
    with atomic_dir(Path(path), replace=True) as tmp:  # the cache is the bench's own
        store.fill(tmp, poisoned, meta, rows=clean.index, source_size=splits.source_train_size)
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
    data = build_data(cell_data_cfg(cfg, poison_dir), recorded=resumed_inputs(run_dir) if resume else None,
                      keep_clean=False)
    # the cell's directory is the bench's own: an interrupted cell resumes, a failed or half-begun one starts over
    summary = train(cfg, resume=resume, data=data, overwrite=not resume)
    return {"attack": attack, "run": run, "seed": seed, "seconds": round(time.time() - t0, 1), "resumed": resume,
            **{k: summary[k] for k in ("final_test_acc", "peak_test_acc", "test_acc_at_best_val", "final_val_acc")}}


# ---------------------------------------------------------------- the driver

def _recipe(cfg: Config, device: str | None = None) -> dict[str, object]:
    """The settings a cell's result depends on, flattened to dotted keys, list items by index (not [bench], [log],
    [tune] (a search's own settings, carried by its best_schedule.toml) or thread counts); "auto" by what it means
    on ``device`` (a device type; default: where ``cfg`` trains)."""
    d = to_dict(cfg)
    for section in ("bench", "log", "tune"):
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
    return auto_meaning(flat, device or device_type(cfg))


def recipe_change(run_dir: Path, cfg: Config) -> dict[str, tuple]:
    """{key: (recorded, now)} where the cell already begun in ``run_dir`` ran another recipe than ``cfg``; empty
    when there is no such cell or nothing that matters changed. "auto" settings, on both sides, mean what they
    mean on the device the cell trained on (meta.json; else this machine's): a GPU cell recorded as not
    deterministic is the recipe "auto" asks for there, though not on this CPU; and a bench driven from a machine
    without a GPU (a cluster's head, a laptop rebuilding results.md) keeps the cells its GPU workers trained. (A cell
    resumed on another kind of device is checked by the resume itself, where it runs.)"""
    f = run_dir / "config.toml"
    if not f.is_file():
        return {}
    device = trained_on(run_dir)
    try:
        was = _recipe(load_config(f, recorded=True), device)
    except ConfigError as e:  # a config this version cannot read counts as changed
        return {"config.toml": (str(e), "this version's")}
    return changes(was, _recipe(cfg, device))


def changes(was: dict, now: dict) -> dict[str, tuple]:
    """{key: (was, now)} for every key whose value differs (missing counts as None)."""
    return {k: (was.get(k), now.get(k)) for k in sorted(set(was) | set(now)) if was.get(k) != now.get(k)}


def _finished_summary(run_dir: Path) -> dict | None:
    """The summary of the run in ``run_dir`` if it finished; None when it has none, ended as failed (diverged), or
    its summary cannot be read (cut short)."""
    try:
        sm = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    return sm if isinstance(sm, dict) and sm.get("status", "finished") == "finished" else None


def _failed(run_dir: Path) -> bool:
    """Whether the run in ``run_dir`` has a summary but did not finish (:func:`_finished_summary`): it is run again,
    not reported."""
    return (run_dir / "summary.json").is_file() and _finished_summary(run_dir) is None


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
    base: dict  # the resolved config as a dict (what the pool processes and Ray tasks rebuild each cell's config from)
    seeds: list[int]
    runs: list[str]  # the training runs the defenses are read from
    jobs: int  # pool: processes; ray: the most tasks in flight (0: as many as fit)
    threads: int  # torch threads per task

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


def seed_overrides(overrides: list[str]) -> list[str]:
    """Those of ``overrides`` (``key=value``) that set poison.seed or train.seed, which a bench or a search sets
    itself per seed."""
    return [o for o in overrides if o.removeprefix("--").split("=")[0] in ("poison.seed", "train.seed")]


def plan_bench(config: str, overrides: list[str]) -> Bench:
    """Validate everything once, before any work (nothing is written for a bad config)."""
    cfg = load_config(config, overrides)
    b = cfg.bench
    if b.runner == "ray":  # Ray tasks run in a working directory of Ray's choosing (on other nodes of a cluster)
        absolute_paths(cfg, also=(("bench", "out"),))
    base = to_dict(cfg)
    check_val_size(cfg.data)  # else every poison and cell would fail alone, after bench.json is written
    for where, table in (("attack_overrides", b.attack_overrides), ("defense_overrides", b.defense_overrides)):
        for name, extra in table.items():  # (not `overrides`: the command line's, recorded below)
            if seeded := seed_overrides(extra):  # every seed of the bench: the same run, reported as several
                raise ConfigError(f"bench.{where}.{name}={seeded}: the bench's seeds set poison.seed and train.seed "
                                  f"(bench.seeds: 0, 1, ...); set how many with bench.seeds")
    if "pst" in b.defenses and len(cfg.schedule.stages) < 2:
        raise ConfigError(f"bench.defenses has 'pst' but the recipe's [schedule] has {len(cfg.schedule.stages)} "
                          f"stage(s): give the PST schedule in the recipe")
    groups: dict[str, int] = {}  # layer groups per model config
    for a in b.attacks:  # each attack's own overrides must make a valid config
        try:
            made = asdict(poison_cfg(base, a, 0).poison)
        except ConfigError as e:
            raise ConfigError(f"bench.attack_overrides.{a}={b.attack_overrides.get(a, [])}: {e}") from None
        for r in runs_needed(b.defenses):
            # the entries the cells' config is made of: an error may need both lists (e.g. the attack's poison.eot
            # and the run's data.augment)
            given = [f"bench.{where}.{name}={table[name]}" for where, table, name in
                     (("attack_overrides", b.attack_overrides, a), ("defense_overrides", b.defense_overrides, r))
                     if table.get(name)]
            cells = f"the {a} / {r} cells" + (f" ({' with '.join(given)})" if given else "")
            try:
                ccfg = cell_cfg(base, a, r, 0, Path(b.out))
            except ConfigError as e:
                raise ConfigError(f"{cells}: {e}") from None
            cell = asdict(ccfg.poison)  # a cell records the poison it trains on
            moved = [f"poison.{k}: {made[k]!r} -> {cell[k]!r}" for k in made if k != "ratio" and cell[k] != made[k]]
            if moved:
                raise ConfigError(f"bench.defense_overrides.{r}={b.defense_overrides.get(r, [])} changes the poison "
                                  f"({'; '.join(moved)}): the {a} cells train on the poison made with the recipe's "
                                  f"[poison] and bench.attack_overrides.{a}; a training run may change only "
                                  f"poison.ratio")
            key = repr(ccfg.model)  # its schedule names groups its model has: refused now, not after the poisons
            if key not in groups:
                groups[key] = count_groups(ccfg.model)
            try:
                check_stages(ccfg.schedule.stages, groups[key], ccfg.train.epochs)
            except ConfigError as e:
                raise ConfigError(f"{cells}: {e}") from None
    if b.runner == "ray":
        jobs = b.jobs  # the most tasks in flight; 0 = as many as the cluster's resources hold
        threads = cfg.train.threads or max(1, math.floor(b.cpus_per_cell))  # the CPUs each task asks for
    else:
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
            meta = cached_poison(bench.base, a, s, pdir, "bench.out")
            if meta is None:
                todo.append((a, s, pdir))
            else:
                gen[(a, s)] = meta
    return gen, todo


def cached_poison(base: dict, attack: str, seed: int, pdir: Path, where: str) -> dict | None:
    """The poison.json of the poison cached at ``pdir`` for (attack, seed) under the recipe ``base``; None when none
    is cached there. One made with other settings, or not a store this version reads, is refused (ConfigError
    naming ``where``, the setting that chose the directory); so is a directory there that is not a store (a store
    is renamed into place whole, with its poison.json: anything else there is not pst-dist's to replace)."""
    if not (pdir / store.META).is_file():
        if pdir.exists() and (not pdir.is_dir() or any(pdir.iterdir())):
            raise ConfigError(f"{pdir} exists and is not a poison store (no {store.META}); remove it or choose "
                              f"another {where}")
        return None
    try:
        meta = store.read_meta(pdir)
    except PoisonFileError as e:  # e.g. cached by an earlier version (its own format): not reused
        raise ConfigError(f"{pdir} is not a poison store this version reads ({e}); remove it or choose "
                          f"another {where}") from None
    cfg = poison_cfg(base, attack, seed)
    want = store.parameters(cfg.poison)  # not poison.ratio: the cache holds every
    # image poisoned and each cell applies its ratio (a cell is keyed by its whole recipe, ratio included)
    was = {**store.parameters(PoisonConfig()), **meta["parameters"]}  # a key newer than the cache: default
    if ATTACKS.entry(attack).kind == "model":  # crafted against the recipe's surrogate ([model]): its settings too
        if isinstance(meta.get("model"), dict):  # not block_groups: how PST groups the layers, not the model
            want.update({f"model.{k}": v for k, v in asdict(cfg.model).items() if k != "block_groups"})
            was.update({f"model.{k}": v for k, v in {**asdict(ModelConfig()), **meta["model"]}.items()
                        if k != "block_groups"})
        if "bf16" in meta:  # the surrogate's autocast crafts another poison (recorded since stop 53)
            want["train.bf16"], was["train.bf16"] = cfg.train.bf16, meta["bf16"]
        if cfg.poison.eot and "augment" in meta:  # ... and, with poison.eot, through the training's augmentation
            want["data.augment"], was["data.augment"] = cfg.data.augment, meta["augment"]
    if diff := changes(was, want):  # a resumed run must not reuse a poison made with other settings
        raise ConfigError(f"{pdir} was made with other poison settings (cached, now): {diff}; remove it "
                          f"or choose another {where}")
    return meta


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
        if (sm := _finished_summary(run_dir)) is not None:
            if problem := summary_problem(sm):  # edited by hand? one error naming it, not a traceback
                raise OutputError(f"{run_dir / 'summary.json'}: {problem}; to run that cell again, move {run_dir} out "
                                  f"of the bench's folder")
            done[(a, r, s)] = {"attack": a, "run": r, "seed": s, "seconds": None, "resumed": False,
                               **{k: sm[k] for k in TABLE_KEYS}}
        else:
            todo.append((a, r, s))
    return done, todo


class PoolRunner:
    """Tasks in ``jobs`` spawned processes on this machine; a task's exception comes back as raised there."""

    def __init__(self, jobs: int):
        self.pool = ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn"), initializer=die_with_parent,
                                        initargs=(os.getpid(),))

    def submit(self, fn: Callable, *args):
        return self.pool.submit(fn, *args)

    def wait(self, pending: list):
        return wait(pending, return_when=FIRST_COMPLETED)[0]

    def result(self, task):
        return task.result()

    def close(self, cancel: list) -> None:
        """Wait for the running tasks; those not begun are dropped when ``cancel`` names any (Ctrl-C, an error)."""
        self.pool.shutdown(wait=True, cancel_futures=bool(cancel))


class RayRunner:
    """Each task a Ray task of ``bench.cpus_per_cell`` CPUs (its torch threads) and, where cells train on GPUs,
    ``bench.gpus_per_cell`` GPUs, on the cluster ``RAY_ADDRESS`` names (joined, never stopped) or on a new local Ray
    of this command's own (stopped at :meth:`close`); a Ray this process had already joined is used as it is."""

    def __init__(self, bench: Bench, say: Callable[[str], None]):
        try:
            import ray  # optional heavy dependency (Ray), imported only by bench.runner = "ray"
        except ImportError as e:
            raise ConfigError(f"bench.runner='ray' needs Ray ({e}); install with `make`, or use bench.runner='pool'"
                              ) from None
        self.ray = ray
        self.joined = not ray.is_initialized()  # this command joins (and at close leaves) a Ray
        self.local = self.joined and not os.environ.get("RAY_ADDRESS")  # a new local Ray of its own
        try:
            where = init_ray()
            b = bench.cfg.bench
            gpus, why = self.task_gpus(bench.cfg, ray.cluster_resources())
            cap = f"at most {bench.jobs} in flight (bench.jobs)" if bench.jobs else "as many in flight as fit"
            say(f"Ray: {where}; each poison and cell a task of {b.cpus_per_cell:g} CPU(s) ({bench.threads} torch "
                f"thread(s)) and {gpus:g} GPU(s): {why}; {cap}; out {bench.out} (every node must see it)")
            options = {"num_cpus": b.cpus_per_cell, "num_gpus": gpus}
            self.remote = {fn: ray.remote(fn).options(**options) for fn in (generate_poison, run_cell)}
        except BaseException:  # Ctrl-C during start-up included
            self.close([])
            raise

    def task_gpus(self, cfg: Config, resources: dict) -> tuple[float, str]:
        """(GPUs each task asks for, why): bench.gpus_per_cell where the cells train on a GPU (train.device cuda, or
        auto on a cluster that has GPUs), else none."""
        have, want = resources.get("GPU", 0), cfg.bench.gpus_per_cell
        device = cfg.train.device
        if device == "cpu" or (device == "auto" and not have):
            return 0.0, f"train.device = {device}" + ("" if device == "cpu" else " and the cluster has no GPUs")
        if not have and self.local:  # a local Ray gains no GPUs later: its tasks would wait for ever
            raise ConfigError("train.device='cuda' but the local Ray sees no GPUs; use train.device='cpu' or 'auto', "
                              "or a cluster with GPUs (RAY_ADDRESS)")
        if not want:
            return 0.0, f"train.device = {device} but bench.gpus_per_cell = 0 (tasks share the nodes' GPUs)"
        return want, (f"train.device = {device}, the cluster has {have:g} GPUs" if have else
                      "train.device = cuda, the cluster has no GPUs now (tasks wait for GPU nodes)")

    def submit(self, fn: Callable, *args):
        return self.remote[fn].remote(*args)

    def wait(self, pending: list):
        return self.ray.wait(pending, num_returns=1)[0]

    def result(self, task):
        """The task's result; its exception as the task raised it (as the pool gives it), not Ray's wrapper."""
        try:
            return self.ray.get(task)
        except self.ray.exceptions.RayTaskError as e:
            raise (e.cause if isinstance(e.cause, Exception) else e) from None

    def close(self, cancel: list) -> None:
        """Cancel the tasks ``cancel`` names (Ctrl-C, an error: a running cell stops with its last checkpoint kept);
        leave the Ray this command joined: a local one it started stops, a cluster goes on (only this driver leaves);
        a Ray the process had joined before is left as it is."""
        for task in cancel:
            self.ray.cancel(task)
        if self.joined:
            self.ray.shutdown()


def run_tasks(bench: Bench, gen: dict, todo_p: list, done: dict, todo_c: list, say: Callable[[str], None],
              runner: PoolRunner | RayRunner) -> list[str]:
    """Make the missing poisons and run the cells on ``runner``, each cell as soon as its poison is there, the
    costliest first (with ``bench.runner = "ray"``, at most ``bench.jobs`` tasks in flight unless 0); ``gen`` and
    ``done`` fill in as they finish, and the results are rewritten after each. Returns the errors (a failed poison or
    cell does not stop the others); on Ctrl-C (or any error here) the outstanding tasks are cancelled."""
    b = bench.cfg.bench
    # the costliest runs first, so the workers finish together
    cost = {"adv": 0, "pst": 1}
    waiting = sorted(todo_c, key=lambda c: (cost.get(c[1], 2), c[2]))
    limit = bench.jobs if isinstance(runner, RayRunner) and bench.jobs else None  # a pool queues what it cannot run
    errors: list[str] = []
    bar = tqdm(total=len(todo_p) + len(todo_c), desc="bench", file=sys.stderr)
    out, threads = bench.out, bench.threads
    queue = [(generate_poison, (bench.base, a, s, str(p), threads), ("poison", a, s)) for a, s, p in todo_p]
    pending: dict = {}

    def submit_ready():
        for c in list(waiting):
            a, r, s = c
            if a == "none" or (a, s) in gen:
                pdir = None if a == "none" else str(bench.poison_dir(a, s))
                queue.append((run_cell, (bench.base, a, r, s, str(out), pdir, threads), ("cell", a, r, s)))
                waiting.remove(c)
        while queue and (limit is None or len(pending) < limit):
            fn, args, what = queue.pop(0)
            pending[runner.submit(fn, *args)] = what

    try:
        submit_ready()
        while pending:
            for f in runner.wait(list(pending)):
                what = pending.pop(f)
                bar.update(1)
                try:
                    res = runner.result(f)
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
                else:
                    done[what[1:]] = res
                    say(f"cell {what[1]} / {what[2]} / seed {what[3]}: final {100 * res['final_test_acc']:.1f}, peak "
                        f"{100 * res['peak_test_acc']:.1f} ({res['seconds']:.0f} s"
                        + (", resumed from its checkpoint)" if res["resumed"] else ")"))
            submit_ready()
            write_results(out, b.attacks, b.defenses, bench.seeds, done, gen, bench.command)
    except BaseException:
        runner.close(list(pending))
        raise
    runner.close([])
    bar.close()
    return errors


def run_pool(bench: Bench, gen: dict, todo_p: list, done: dict, todo_c: list, say: Callable[[str], None]) -> list[str]:
    """:func:`run_tasks` in ``bench.jobs`` processes on this machine."""
    return run_tasks(bench, gen, todo_p, done, todo_c, say, PoolRunner(bench.jobs))


def run_ray(bench: Bench, gen: dict, todo_p: list, done: dict, todo_c: list, say: Callable[[str], None]) -> list[str]:
    """:func:`run_tasks` as Ray tasks (:class:`RayRunner`)."""
    return run_tasks(bench, gen, todo_p, done, todo_c, say, RayRunner(bench, say))

BENCH_WRITES = ("results.csv", "results.md", "heatmap.png")
"""The files a bench writes over in ``bench.out`` beside its record ``bench.json`` (its cells are run directories,
checked as runs; its poisons/ stores, checked as stores, may be a search's cache shared with it)."""


def check_bench_out(out: Path) -> None:
    """``bench.out`` may be a folder the user already had (or a search's poison cache), but one holding the files a
    bench writes over without a bench's record (``bench.json``) is not a bench's: refused (OutputError)."""
    if out.is_symlink() and not out.is_dir() or out.exists() and not out.is_dir():
        raise OutputError(f"bench.out={str(out)!r}: exists and is not a directory")
    check_written_over(out, BENCH_WRITES, (out / "bench.json").is_file(), option="bench.out", command="a bench",
                       missing="no bench.json")


def run_bench(config: str, overrides: list[str]) -> dict:
    bench = plan_bench(config, overrides)
    b, out = bench.cfg.bench, bench.out
    say = lambda m: tqdm.write(f"[bench] {m}", file=sys.stderr)
    where = (f"{bench.jobs} job(s) x {bench.threads} thread(s)" if b.runner == "pool" else
             "Ray tasks (runner = ray)")
    say(f"{len(b.attacks)} attacks x {len(b.defenses)} defenses ({len(bench.runs)} training runs each: "
        f"{', '.join(bench.runs)}) x {len(bench.seeds)} seeds; {where}; out {out}")
    t_start = time.time()
    check_bench_out(out)
    gen, todo_p = cached_poisons(bench)  # may refuse: before bench.json records these overrides
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "bench.json", json.dumps({"config": config, "overrides": overrides, "resolved": bench.base},
                                                indent=2))
    done, todo_c = finished_cells(bench, say)
    say(f"poisons: {len(gen)} cached, {len(todo_p)} to make; cells: {len(done)} finished (skipped), "
        f"{len(todo_c)} to run")
    errors = (run_ray if b.runner == "ray" else run_pool)(bench, gen, todo_p, done, todo_c, say)
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
    if machines := _machines(out, attacks, seeds, done, gen):
        lines += ["", *machines]
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


def _machines(out: Path, attacks: list[str], seeds: list[int], done: dict, gen: dict) -> list[str]:
    """Which machines computed the table (:func:`pst_dist.metrics.computed_on`): each finished cell's run segments
    and each poison's poison.json ``machine``."""
    each: dict[str, Counter] = defaultdict(Counter)
    for a, r, s in done:
        if a in attacks and s in seeds:
            for d in run_machines(out / "cells" / a / r / f"seed{s}"):
                each[d]["cell"] += 1
    for (a, s), m in gen.items():
        if a in attacks and s in seeds:
            each[describe_machine(m.get("machine"))]["poison"] += 1
    return computed_on(each)


def _verdicts(attacks, defenses, vals) -> str:
    """The acceptance questions, answered from the table: does standard training collapse; is PST >= JPEG-10 and
    >= 80 % at the final epoch. A table written while cells still run names the attacks without a result yet."""
    final = {d: {a: statistics.mean(xs) if (xs := vals(a, d, 0)) else None for a in attacks}
             for d in ("pst", "jpeg10", "standard") if d in defenses}
    pst, poisoned = final["pst"], [a for a in attacks if a != "none"]

    def yet(*ds) -> str:
        missing = [a for a in poisoned if any(final[d][a] is None for d in ds)]
        return f"; no result yet: {', '.join(missing)}" if missing else ""

    out = []
    if "jpeg10" in final:
        jpeg = final["jpeg10"]
        ge = [a for a in poisoned if None not in (pst[a], jpeg[a]) and pst[a] >= jpeg[a]]
        out.append(f"- PST final >= JPEG-10 final on {len(ge)} of {len(poisoned)} attacks "
                   f"({', '.join(ge) or 'none'}{yet('pst', 'jpeg10')}).")
    measured = [a for a in poisoned if pst[a] is not None]
    below = [a for a in measured if pst[a] < 0.80]
    out.append(f"- PST final >= 80 % on {len(measured) - len(below)} of {len(poisoned)} attacks "
               f"(below: {', '.join(below) or 'none'}{yet('pst')}).")
    if "standard" in final:
        std = [f"{a} {100 * v:.1f}" for a, v in final["standard"].items() if v is not None]
        out.append("- Standard training, final: " + ", ".join(std) + ".")
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
