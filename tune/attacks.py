"""A search over several attacks at once (``tune.attacks``): one PST recipe for data protected by an attack the
auditor does not know.

Every trial trains one run per attack on the same schedule, in lockstep (epoch 1 of every attack, then epoch 2, ...,
each run resuming from its own checkpoint), and reports each epoch's **worst** validation accuracy over the attacks
as ``val_acc``, the objective ASHA / PBT act on; each attack's figures are reported beside it (``val_acc_<attack>``,
``test_acc_<attack>``). With ``tune.seeds`` every attack has one run per seed (seed s: the attack's seed-s poison and
``train.seed = s``, as a bench cell's seed s), and an attack's figure is the mean over its seeds before the worst case
is taken. The poisons are made once, before any trial, as ``pst-dist bench`` makes them (the same stores, so a
bench's cache serves a search and the other way round); the trials only read them.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

from pst_dist.config import Config, to_dict
from pst_dist.data.pipeline import build_data
from pst_dist.matrix import cached_poison, cell_data_cfg, generate_poison, poison_cfg

#: the per-epoch figures of one attack's run that a multi-attack trial reports (and reduces to the worst case)
PER_ATTACK = {"eval/val_acc": "val_acc", "eval/test_acc": "test_acc"}


def poison_root(cfg: Config) -> Path:
    """The directory of the search's poison stores (``tune.poisons``, or one beside the search's own)."""
    return Path(cfg.tune.poisons) if cfg.tune.poisons else Path(cfg.tune.out) / f"{cfg.tune.name}_poisons"


def store_dir(cfg: Config, attack: str, seed: int | None = None) -> Path | None:
    """Where the attack's poison store of ``seed`` (default ``poison.seed``) lies (None for ``none``, the clean
    data)."""
    seed = cfg.poison.seed if seed is None else seed
    return None if attack == "none" else poison_root(cfg) / f"{attack}_seed{seed}"


def trial_runs(cfg: Config) -> dict[str, tuple[str, int | None]]:
    """A multi-attack trial's runs: {run subdirectory: (attack, seed)}; ``<attack>`` with the config's own seeds, or
    ``<attack>/seed<s>`` for each of ``tune.seeds``."""
    if not cfg.tune.seeds:
        return {a: (a, None) for a in cfg.tune.attacks}
    return {f"{a}/seed{s}": (a, s) for a in cfg.tune.attacks for s in cfg.tune.seeds}


def prepare_poisons(cfg: Config, log=lambda m: print(m, file=sys.stderr)) -> dict[str, float]:
    """Make the poisons the search's attacks (and seeds) need and are not cached yet (in this process, the driver,
    before any trial starts); refuse a cached one made with other settings, and a directory in its place that is not
    a store. Returns {store name: seconds it took to make} for those made."""
    base = to_dict(cfg)
    made = {}
    for a, seed in trial_runs(cfg).values():
        pdir = store_dir(cfg, a, seed)
        seed = cfg.poison.seed if seed is None else seed
        if pdir is None or cached_poison(base, a, seed, pdir, "tune.poisons") is not None:
            continue
        log(f"[tune] making the {a} poison (seed {seed}) at {pdir}")
        t0 = time.time()
        generate_poison(base, a, seed, str(pdir), cfg.train.threads)
        made[pdir.name] = round(time.time() - t0, 1)
    return made


def attack_config(cfg: Config, attack: str, seed: int | None = None) -> Config:
    """One run of a trial: the trial's config with that attack's poison settings (as the bench records a cell's: the
    attack and its ``[bench.attack_overrides]``; with ``seed``, ``poison.seed`` and ``train.seed`` too), in
    ``<trial run dir>/<attack>`` (``/seed<s>`` with a seed)."""
    out = poison_cfg(to_dict(cfg), attack, seed)
    run_dir = Path(cfg.log.run_dir) / attack
    out.log.run_dir = str(run_dir if seed is None else run_dir / f"seed{seed}")
    return out


def attack_data(run_cfg: Config, trial_cfg: Config, attack: str):
    """The data of ``run_cfg`` (one run of a trial), its poison read from the search's store of its
    ``poison.seed`` (checked against its hashes, as the bench's cells)."""
    pdir = store_dir(trial_cfg, attack, run_cfg.poison.seed)
    return build_data(cell_data_cfg(run_cfg, None if pdir is None else str(pdir)), keep_clean=False)


def attack_means(values: dict[str, float], runs: dict[str, tuple[str, int | None]]) -> dict[str, float]:
    """{attack: the mean of its runs' values} from {run: value} (``runs``: {run: (attack, seed)}, as
    :func:`trial_runs` gives): one value per attack without tune.seeds, the mean over its seeds with them."""
    per: dict[str, list[float]] = {}
    for r, v in values.items():
        per.setdefault(runs[r][0], []).append(v)
    return {a: sum(v) / len(v) for a, v in per.items()}


def extreme(pick, values) -> float:
    """``pick`` (min or max) of ``values``; NaN if any is NaN (min() and max() over a NaN depend on where it
    stands)."""
    values = list(values)
    return math.nan if any(math.isnan(v) for v in values) else pick(values)


def worst_case(logs: dict[str, dict], runs: dict[str, tuple[str, int | None]] | None = None) -> dict[str, float]:
    """One epoch's report from every run's logs ({run: logs}; ``runs``: {run: (attack, seed)} as
    :func:`trial_runs` gives, default one run per attack): ``val_acc`` / ``test_acc`` the lowest over the attacks of
    each attack's mean over its seeds (the objective; the test figure is only reported), each attack's figure
    beside them."""
    runs = runs or {a: (a, None) for a in logs}
    out: dict[str, float] = {}
    for key, name in PER_ATTACK.items():
        missing = [r for r, lg in logs.items() if key not in lg]
        if missing:  # a worst case over fewer runs would look better than it is
            raise RuntimeError(f"the runs of {missing} reported no {key} this epoch")
        vals = attack_means({r: float(lg[key]) for r, lg in logs.items()}, runs)
        out[name] = extreme(min, vals.values())
        out.update({f"{name}_{a}": v for a, v in vals.items()})
    return out
