"""A search over several attacks at once (``tune.attacks``): one PST recipe for data protected by an attack the
auditor does not know.

Every trial trains one run per attack on the same schedule, in lockstep (epoch 1 of every attack, then epoch 2, ...,
each run resuming from its own checkpoint), and reports each epoch's **worst** validation accuracy over the attacks
as ``val_acc``, the objective ASHA / PBT act on; each attack's figures are reported beside it (``val_acc_<attack>``,
``test_acc_<attack>``). The poisons are made once, before any trial, as ``pst-dist bench`` makes them (the same
stores, so a bench's cache serves a search and the other way round); the trials only read them.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from pst_dist.config import Config, to_dict
from pst_dist.data.pipeline import build_data
from pst_dist.matrix import cached_poison, cell_data_cfg, generate_poison, with_overrides

#: the per-epoch figures of one attack's run that a multi-attack trial reports (and reduces to the worst case)
PER_ATTACK = {"eval/val_acc": "val_acc", "eval/test_acc": "test_acc"}


def poison_root(cfg: Config) -> Path:
    """The directory of the search's poison stores (``tune.poisons``, or one beside the search's own)."""
    return Path(cfg.tune.poisons) if cfg.tune.poisons else Path(cfg.tune.out) / f"{cfg.tune.name}_poisons"


def store_dir(cfg: Config, attack: str) -> Path | None:
    """Where the attack's poison store lies (None for ``none``, the clean data)."""
    return None if attack == "none" else poison_root(cfg) / f"{attack}_seed{cfg.poison.seed}"


def prepare_poisons(cfg: Config, log=lambda m: print(m, file=sys.stderr)) -> dict[str, float]:
    """Make the poisons the search's attacks need and are not cached yet (in this process, before Ray starts);
    refuse a cached one made with other settings, and a directory in its place that is not a store. Returns {attack:
    seconds it took to make} for those made."""
    base = to_dict(cfg)
    made = {}
    for a in cfg.tune.attacks:
        pdir = store_dir(cfg, a)
        if pdir is None or cached_poison(base, a, cfg.poison.seed, pdir, "tune.poisons") is not None:
            continue
        log(f"[tune] making the {a} poison (seed {cfg.poison.seed}) at {pdir}")
        t0 = time.time()
        generate_poison(base, a, cfg.poison.seed, str(pdir), cfg.train.threads)
        made[a] = round(time.time() - t0, 1)
    return made


def attack_config(cfg: Config, attack: str) -> Config:
    """One attack's run in a trial: the trial's config with that attack's poison settings (as the bench records a
    cell's: the attack and its ``[bench.attack_overrides]``), in ``<trial run dir>/<attack>``."""
    out = with_overrides(to_dict(cfg), [f'poison.kind="{attack}"', *cfg.bench.attack_overrides.get(attack, [])])
    out.log.run_dir = str(Path(cfg.log.run_dir) / attack)
    return out


def attack_data(run_cfg: Config, trial_cfg: Config, attack: str):
    """The data of ``run_cfg`` (one attack's run), its poison read from the search's store (checked against its
    hashes, as the bench's cells)."""
    pdir = store_dir(trial_cfg, attack)
    return build_data(cell_data_cfg(run_cfg, None if pdir is None else str(pdir)))


def worst_case(logs: dict[str, dict]) -> dict[str, float]:
    """One epoch's report from every attack's logs: ``val_acc`` / ``test_acc`` the lowest over the attacks (the
    objective; the test figure is only reported), each attack's own figures beside them."""
    out: dict[str, float] = {}
    for key, name in PER_ATTACK.items():
        missing = [a for a, lg in logs.items() if key not in lg]
        if missing:  # a worst case over fewer attacks would look better than it is
            raise RuntimeError(f"the runs of {missing} reported no {key} this epoch")
        vals = {a: float(lg[key]) for a, lg in logs.items()}
        out[name] = min(vals.values())
        out.update({f"{name}_{a}": v for a, v in vals.items()})
    return out
