"""``pst-dist tune``: the Ray Tune search over PST schedules, and what it leaves behind.

A local Ray is started when no cluster address is given (``RAY_ADDRESS`` unset; dashboard on 127.0.0.1); under
``ray job submit`` the address is set and the search attaches to that cluster (under ``ray submit`` tune/run.py sets
it to the cluster ``ray start`` started on the head, where ``ray submit`` runs it).
"""

from __future__ import annotations

import itertools
import os
import sys
from pathlib import Path

from pst_dist.config import (
    RESUME_MAY_CHANGE,
    Config,
    ConfigError,
    absolute_paths,
    dump_toml,
    from_dict,
    load_config,
    to_dict,
)
from pst_dist.data.beton import BetonDir
from pst_dist.data.sources import check_present, check_val_size
from pst_dist.distributed import init_ray
from pst_dist.io import check_written_over, uncreatable, write_atomic
from pst_dist.matrix import seed_overrides
from pst_dist.models import count_groups
from pst_dist.pst.schedule import Schedule
from pst_dist.rundir import is_recorded_config, listed_changes, resume_changes

from .attacks import attack_config, poison_root, prepare_poisons, trial_runs
from .report import REPORTS, write_reports
from .space import EXTRA, extra_choices, grid_size, mult_keys, schedules_offered, skeletons, trial_config
from .trial import run_trial

SEARCH_RECORD = "search_config.toml"
"""The config a search started with, in its directory: ``--resume`` is checked against it."""
SEARCH_RESUME_MAY_CHANGE = tuple(k for k in RESUME_MAY_CHANGE if k not in ("train.epochs", "tune", "bench"))
"""What ``pst-dist tune --resume`` accepts as changed: what a run's resume accepts but the length of training (the
scheduler's rungs were set from it), the search's own [tune] section and the [bench] one its attack runs take their
overrides from (Ray restores the search's space, scheduler and trials as they were; a trial trained under one base
config and continued under another would be recorded as neither)."""


def check_resumed_search(cfg: Config, search_dir: Path, log) -> None:
    """``--resume``: refuse every difference from the config the search started with (:data:`SEARCH_RECORD`) but
    :data:`SEARCH_RESUME_MAY_CHANGE`, naming each key. A search started before the record existed is said so."""
    record = search_dir / SEARCH_RECORD
    if not record.is_file():
        log(f"[tune] {search_dir} has no {SEARCH_RECORD} (a search started before pst-dist recorded it): this "
            f"resume's config is not checked against the one the search started with")
        return
    try:
        recorded = load_config(record, recorded=True)
    except ConfigError as e:
        raise ConfigError(f"--resume: the search's recorded config cannot be read ({e})") from None
    _, refused = resume_changes(recorded, cfg, SEARCH_RESUME_MAY_CHANGE)
    if refused:
        raise ConfigError(f"--resume: the config differs from the one the search in {search_dir} started with "
                          f"({listed_changes(refused)}). A resumed search continues what it started; only "
                          f"{', '.join(SEARCH_RESUME_MAY_CHANGE)} may change. Start a new search (another "
                          f"tune.name) for other settings")


def param_space(cfg: Config, groups: int) -> dict:
    """Ray Tune's search space: valid skeletons (lengths + unfreeze order), warm-up thresholds, per-stage lr mults."""
    from ray import tune  # optional heavy dependency (Ray), imported only by tune

    pick = tune.grid_search if cfg.tune.search == "grid" else tune.choice
    space = {"skeleton": pick([s.key() for s in skeletons(cfg, groups)]), "threshold": pick(cfg.tune.thresholds)}
    space.update({k: pick(cfg.tune.release_mults) for k in mult_keys(cfg)})
    space.update({k: pick(v) for k, v in extra_choices(cfg).items()})
    return space


def check_space(cfg: Config, groups: int) -> None:
    """Every schedule the search may offer must be a valid schedule for the model (named groups exist), and every
    attack's run a valid config (its ``[bench.attack_overrides]``)."""
    offered = schedules_offered(cfg, groups)
    for params in offered:
        Schedule(trial_config(cfg, params).schedule.stages, groups, 1, cfg.train.epochs)
    extra = extra_choices(cfg)  # each combination of the loss choices makes a config its stages accept
    for values in itertools.product(*extra.values()):
        params = {**offered[0], **dict(zip(extra, values, strict=True))}
        try:
            from_dict(Config, to_dict(trial_config(cfg, params)))  # the checks a trial's worker runs
        except ConfigError as e:
            chosen = ", ".join(f"tune.{EXTRA[k]}={v!r}" for k, v in zip(extra, values, strict=True))
            raise ConfigError(f"the search space offers a trial that cannot train ({chosen}): {e}") from None
    for a in cfg.tune.attacks:
        # the run would train another seed than its directory says, on a store never made
        if seeded := seed_overrides(cfg.bench.attack_overrides.get(a, [])):
            raise ConfigError(f"bench.attack_overrides.{a}={seeded}: a search's runs take their seeds from "
                              f"tune.seeds (or the config's own poison.seed and train.seed); set them there")
    for a, seed in trial_runs(cfg).values():
        try:
            attack_config(cfg, a, seed)
        except ConfigError as e:
            raise ConfigError(f"tune.attacks: the {a} run (bench.attack_overrides.{a}="
                              f"{cfg.bench.attack_overrides.get(a, [])}): {e}") from None


def on_cluster() -> bool:
    """Whether the search runs on a cluster someone started (``RAY_ADDRESS`` set, as ``ray job submit`` does and
    tune/run.py under ``ray submit``) rather than on a local Ray of its own."""
    return bool(os.environ.get("RAY_ADDRESS"))


def declare_resources(cfg: Config) -> str:
    """Resolve ``tune.use_gpu = auto`` once, in the driver: yes when the cluster has GPUs now (on a local Ray: this
    machine), else no, said in the log line. On an autoscaling cluster whose GPU workers are not up yet, declare
    ``tune.use_gpu = yes``: the request then makes the autoscaler launch them (``auto`` would train on CPUs). The
    resolved value goes into the config every trial gets (and records). Returns a description."""
    import ray  # optional heavy dependency (Ray), imported only by tune

    t = cfg.tune
    note = ""
    if t.use_gpu == "auto":
        t.use_gpu = "yes" if ray.cluster_resources().get("GPU", 0) > 0 else "no"
        if t.use_gpu == "no" and on_cluster():
            note = (" (tune.use_gpu=auto: no GPU on the cluster now, trials run on CPUs; on an autoscaling GPU "
                    "cluster declare --tune.use_gpu=yes so that the autoscaler launches GPU nodes)")
    if t.use_gpu == "yes" and t.workers > 1 and t.gpus_per_worker < 1:
        raise ConfigError(f"tune.gpus_per_worker={t.gpus_per_worker:g} with tune.workers={t.workers}: Ray may put "
                          f"two workers of one trial on one GPU, and NCCL refuses two ranks on one device; a "
                          f"fraction packs trials of one worker each (tune.workers=1), or give each worker a GPU")
    gpus = f" + {t.gpus_per_worker:g} GPU" if t.use_gpu == "yes" else ""
    return f"each trial asks for {t.workers} worker(s) x ({t.cpus_per_worker:g} CPU{gpus}){note}"


def max_concurrent(cfg: Config) -> int:
    """``tune.max_concurrent``; 0 = no cap on a cluster (the declared requests queue, an autoscaler adds nodes for
    them), and on a local Ray (this machine, nothing to add) as many trials as it holds."""
    import ray  # optional heavy dependency (Ray), imported only by tune

    t = cfg.tune
    if on_cluster():
        return t.max_concurrent
    res = ray.cluster_resources()  # a local Ray: a trial it cannot hold would wait for ever
    fits = int(res.get("CPU", 1) // (t.workers * t.cpus_per_worker))
    if t.use_gpu == "yes":
        fits = min(fits, int(res.get("GPU", 0) // (t.workers * t.gpus_per_worker)))
    if fits < 1:
        raise ConfigError(f"one trial needs tune.workers x (tune.cpus_per_worker CPUs"
                          f"{' + tune.gpus_per_worker GPUs' if t.use_gpu == 'yes' else ''}) = {t.workers} x "
                          f"({t.cpus_per_worker:g}{f' + {t.gpus_per_worker:g}' if t.use_gpu == 'yes' else ''}); "
                          f"this machine has {res.get('CPU', 0):g} CPUs, {res.get('GPU', 0):g} GPUs")
    return t.max_concurrent or fits


def build_tuner(cfg: Config, search_dir: Path, resume: bool, groups: int, concurrent: int):
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
        mutations = {"threshold": list(t.thresholds), **{k: list(t.release_mults) for k in mult_keys(cfg)},
                     **extra_choices(cfg)}
        scheduler = PopulationBasedTraining(time_attr="epoch", perturbation_interval=t.pbt_interval,
                                            quantile_fraction=0.25, hyperparam_mutations=mutations, synch=True)
    else:
        scheduler = FIFOScheduler()
    return tune.Tuner(
        trainable, param_space=param_space(cfg, groups),
        tune_config=tune.TuneConfig(metric="val_acc", mode="max", scheduler=scheduler,
                                    num_samples=1 if t.search == "grid" else t.num_samples,
                                    search_alg=BasicVariantGenerator(random_state=t.seed,
                                                                     max_concurrent=concurrent)),
        run_config=tune.RunConfig(name=t.name, storage_path=str(Path(t.out)),
                                  failure_config=tune.FailureConfig(max_failures=t.max_failures), verbose=1))


def run_search(cfg: Config, resume: bool | str = False, log=lambda m: print(m, file=sys.stderr)) -> dict:
    """Run (or continue) the search; write results.csv / results.md / trials.png / best_schedule.toml into
    ``<tune.out>/<tune.name>/``. Returns the report summary. ``resume="auto"``: continue the search when its
    directory holds one, else begin it."""
    absolute_paths(cfg, also=(("tune", "out"), ("tune", "poisons")))
    groups = count_groups(cfg.model)
    check_space(cfg, groups)  # every error before Ray starts
    check_val_size(cfg.data)  # trials are chosen on validation accuracy: none would fail every trial inside Ray
    if not on_cluster():  # the trials read the data on this machine: a bad data.root would fail each inside Ray
        if cfg.data.source == "beton":
            BetonDir(cfg.data.root, verify=False)  # its structure; the trials verify the hashes
        else:
            check_present(cfg.data)
    search_dir = Path(cfg.tune.out) / cfg.tune.name
    if resume:
        from ray.tune import Tuner  # optional heavy dependency (Ray), imported only by tune

        if resume == "auto":  # a job launched again after its head went away: continue the search, or begin it
            resume = Tuner.can_restore(str(search_dir))
            log(f"[tune] --resume=auto: {'continuing the search in' if resume else 'no search yet in'} {search_dir}")
        elif not Tuner.can_restore(str(search_dir)):
            raise ConfigError(f"--resume: no search to continue at {search_dir} (tune.out / tune.name)")
    if cfg.tune.attacks:
        cfg.tune.poisons = str(poison_root(cfg))  # the trials' configs (and the recorded ones) name the stores
    # before Ray starts and poisons are made: a file in the way, or no permission, is refused now
    dirs = [(search_dir, f"tune.out={cfg.tune.out!r} / tune.name={cfg.tune.name!r}")]
    if cfg.tune.attacks:
        dirs.append((Path(cfg.tune.poisons), f"tune.poisons={cfg.tune.poisons!r}"))
    for where, named in dirs:
        if (problem := uncreatable(where)) is not None:
            raise ConfigError(f"{named}: {where} cannot be created or written: {problem}")
    if resume:
        check_resumed_search(cfg, search_dir, log)
    elif (search_dir / SEARCH_RECORD).exists() and not is_recorded_config(search_dir / SEARCH_RECORD):
        raise ConfigError(f"{search_dir / SEARCH_RECORD}: exists and is not a search's recorded config; pst-dist "
                          f"will not write over it: choose another tune.out or tune.name")
    elif search_dir.is_dir():
        from ray.tune import Tuner  # optional heavy dependency (Ray), imported only by tune

        if Tuner.can_restore(str(search_dir)):  # a second search's trials and reports would mix with the first's
            raise ConfigError(f"{search_dir} already holds a search (tune.out / tune.name): pass --resume to "
                              f"continue it, or choose another tune.name for a new one")
        # the reports are written over what is there at the end: a user's own results.csv is not ours to replace
        check_written_over(search_dir, REPORTS, (search_dir / SEARCH_RECORD).is_file(), option="tune.out/tune.name",
                           command="a search", missing=f"no {SEARCH_RECORD}")
    record = dump_toml(cfg)  # as asked: before Ray resolves what "auto" means on this cluster (tune.use_gpu)
    where = init_ray()
    resources = declare_resources(cfg)  # before max_concurrent: it resolves tune.use_gpu
    concurrent = max_concurrent(cfg)  # a trial this machine cannot hold is refused before poisons are made
    if cfg.tune.attacks:  # before any trial: a poison takes minutes to make, a trial must not wait for it
        made = prepare_poisons(cfg, log)
        seeds = f" x seeds {cfg.tune.seeds}" if cfg.tune.seeds else ""
        log(f"[tune] every trial trains {len(trial_runs(cfg))} runs ({', '.join(cfg.tune.attacks)}{seeds}) on the "
            f"poisons in {cfg.tune.poisons}" + (f"; made now: {made} (seconds)" if made else "")
            + f"; objective: the worst validation accuracy over the attacks{' (mean over seeds)' if seeds else ''}")
    n = grid_size(cfg, groups)
    engine = f"DeepSpeed ZeRO-{cfg.deepspeed.zero_stage}" if cfg.deepspeed.enabled else "torch"
    log(f"[tune] {len(skeletons(cfg, groups))} valid skeletons (lengths x unfreeze order), {n} schedules in the "
        f"grid; search={cfg.tune.search} scheduler={cfg.tune.scheduler}; each trial {cfg.tune.workers} Ray Train "
        f"workers ({engine})")
    log(f"[tune] Ray: {where}; search directory {search_dir}; {resources}; at most "
        f"{concurrent or 'any number of'} trials at once")
    tuner = build_tuner(cfg, search_dir, resume, groups, concurrent)
    if not resume:
        search_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(search_dir / SEARCH_RECORD, record)
    results = tuner.fit()  # returns, not raises, when Ctrl-C (SIGINT) or SIGUSR1 stops the search
    return write_reports(cfg, results, search_dir, log, unfinished=unfinished_trials(cfg, groups, search_dir))


def unfinished_trials(cfg: Config, groups: int, search_dir: Path) -> int:
    """Trials of the search that neither ended nor failed: those not yet created, and those the experiment state
    Ray saved at the end of ``fit`` holds as pending, running or paused (a stopped search; in the returned results
    Ray's clean-up has marked the running ones terminated)."""
    from ray.tune import ExperimentAnalysis  # optional heavy dependency (Ray), imported only by tune

    saved = ExperimentAnalysis(str(search_dir)).trials
    expected = grid_size(cfg, groups) if cfg.tune.search == "grid" else cfg.tune.num_samples
    ended = sum(t.status in ("TERMINATED", "ERROR") for t in saved)
    return max(max(expected, len(saved)) - ended, 0)
