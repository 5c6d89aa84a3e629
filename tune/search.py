"""``pst-dist tune``: the Ray Tune search over PST schedules, and what it leaves behind.

A local Ray is started when no cluster address is given (``RAY_ADDRESS`` unset; dashboard on 127.0.0.1); under
``ray job submit`` or ``ray submit`` the address is set and the search attaches to that cluster.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from pst_dist.config import Config, ConfigError, to_dict
from pst_dist.models import build_model
from pst_dist.pst.groups import layer_groups
from pst_dist.pst.schedule import Schedule

from .report import write_reports
from .space import grid_size, mult_keys, schedules_offered, skeletons, trial_config
from .trial import run_trial


def num_groups(cfg: Config) -> int:
    """Layer groups of the configured model (built on the CPU with the configured image size; the group count does
    not depend on channels or classes)."""

    return len(layer_groups(build_model(cfg.model, 10, 3, cfg.data.img_size), cfg.model.block_groups))


def absolute_paths(cfg: Config) -> None:
    """Trials run in other processes and directories (other machines on a cluster): no relative paths."""
    for section, key in (("data", "root"), ("poison", "path"), ("tune", "out")):
        obj = getattr(cfg, section)
        value = getattr(obj, key)
        if value:
            setattr(obj, key, str(Path(value).expanduser().resolve()))


def param_space(cfg: Config, groups: int) -> dict:
    """Ray Tune's search space: valid skeletons (lengths + unfreeze order), warm-up thresholds, per-stage lr mults."""
    from ray import tune  # optional heavy dependency (Ray), imported only by tune

    pick = tune.grid_search if cfg.tune.search == "grid" else tune.choice
    space = {"skeleton": pick([s.key() for s in skeletons(cfg, groups)]), "threshold": pick(cfg.tune.thresholds)}
    space.update({k: pick(cfg.tune.release_mults) for k in mult_keys(cfg)})
    return space


def check_space(cfg: Config, groups: int) -> None:
    """Every schedule the search may offer must be a valid schedule for the model (named groups exist)."""
    for params in schedules_offered(cfg, groups):
        Schedule(trial_config(cfg, params).schedule.stages, groups, 1, cfg.train.epochs)


def init_ray(cfg: Config) -> str:
    import ray  # optional heavy dependency (Ray), imported only by tune

    if ray.is_initialized():
        return "already initialised"
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True)  # attaches to the cluster RAY_ADDRESS names (set by ray job submit / ray submit)
        return f"cluster at {os.environ['RAY_ADDRESS']}"
    # address="local": always a new Ray of this process's own, never a cluster someone started on this machine
    ray.init(address="local", dashboard_host="127.0.0.1", include_dashboard=None)
    return "a new local Ray (dashboard on 127.0.0.1)"


def max_concurrent(cfg: Config) -> int:
    import ray  # optional heavy dependency (Ray), imported only by tune

    if cfg.tune.max_concurrent:
        return cfg.tune.max_concurrent
    res = ray.cluster_resources()
    fits = int(res.get("CPU", 1) // (cfg.tune.workers * cfg.tune.cpus_per_worker))
    if cfg.tune.use_gpu != "no" and res.get("GPU", 0) >= 1:
        fits = min(fits, int(res["GPU"] // cfg.tune.workers))
    if fits < 1:
        raise ConfigError(f"one trial needs tune.workers x tune.cpus_per_worker = {cfg.tune.workers} x "
                          f"{cfg.tune.cpus_per_worker} CPUs, the cluster has {res.get('CPU', 0):g}")
    return fits


def build_tuner(cfg: Config, search_dir: Path, resume: bool, groups: int):
    from ray import tune  # optional heavy dependency (Ray), imported only by tune

    # optional heavy dependency (Ray), imported only by tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, PopulationBasedTraining
    from ray.tune.search import BasicVariantGenerator  # optional heavy dependency (Ray), imported only by tune

    t = cfg.tune
    trainable = tune.with_resources(tune.with_parameters(run_trial, base=to_dict(cfg), search_dir=str(search_dir)),
                                    {"CPU": 0, "memory": 1})  # the driver only waits (Ray wants a non-empty request)
    if resume:
        return tune.Tuner.restore(str(search_dir), trainable=trainable, resume_unfinished=True, resume_errored=True)
    if t.scheduler == "asha":
        scheduler = ASHAScheduler(time_attr="epoch", max_t=cfg.train.epochs, grace_period=t.grace_period,
                                  reduction_factor=t.reduction_factor)
    elif t.scheduler == "pbt":
        mutations = {"threshold": list(t.thresholds), **{k: list(t.release_mults) for k in mult_keys(cfg)}}
        scheduler = PopulationBasedTraining(time_attr="epoch", perturbation_interval=t.pbt_interval,
                                            quantile_fraction=0.25, hyperparam_mutations=mutations, synch=True)
    else:
        scheduler = FIFOScheduler()
    return tune.Tuner(
        trainable, param_space=param_space(cfg, groups),
        tune_config=tune.TuneConfig(metric="val_acc", mode="max", scheduler=scheduler,
                                    num_samples=1 if t.search == "grid" else t.num_samples,
                                    search_alg=BasicVariantGenerator(random_state=t.seed,
                                                                     max_concurrent=max_concurrent(cfg))),
        run_config=tune.RunConfig(name=t.name, storage_path=str(Path(t.out)),
                                  failure_config=tune.FailureConfig(max_failures=t.max_failures), verbose=1))


def run_search(cfg: Config, resume: bool = False, log=lambda m: print(m, file=sys.stderr)) -> dict:
    """Run (or continue) the search; write results.csv / results.md / trials.png / best_schedule.toml into
    ``<tune.out>/<tune.name>/``. Returns the report summary."""
    absolute_paths(cfg)
    groups = num_groups(cfg)
    check_space(cfg, groups)  # every error before Ray starts
    search_dir = Path(cfg.tune.out) / cfg.tune.name
    n = grid_size(cfg, groups)
    engine = f"DeepSpeed ZeRO-{cfg.deepspeed.zero_stage}" if cfg.deepspeed.enabled else "torch"
    log(f"[tune] {len(skeletons(cfg, groups))} valid skeletons (lengths x unfreeze order), {n} schedules in the "
        f"grid; search={cfg.tune.search} scheduler={cfg.tune.scheduler}; each trial {cfg.tune.workers} Ray Train "
        f"workers ({engine})")
    if resume:
        from ray.tune import Tuner  # optional heavy dependency (Ray), imported only by tune

        if not Tuner.can_restore(str(search_dir)):
            raise ConfigError(f"--resume: no search to continue at {search_dir} (tune.out / tune.name)")
    log(f"[tune] Ray: {init_ray(cfg)}; search directory {search_dir}")
    tuner = build_tuner(cfg, search_dir, resume, groups)
    results = tuner.fit()
    return write_reports(cfg, results, search_dir, log)
