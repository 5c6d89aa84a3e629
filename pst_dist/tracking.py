"""Experiment trackers beside TensorBoard (``log.trackers``; the table is :data:`pst_dist.registry.TRACKERS`):
Weights & Biases and MLflow, each an optional extra. Only rank 0 opens them (through
:class:`pst_dist.metrics.Metrics`); they get the scalars TensorBoard gets, and the config once per run (W&B config,
MLflow parameters). Their files stay in the run directory (``wandb/``, ``mlruns/``) unless the config names a server;
``trackers.json`` there records each tracker's run id, so that ``--resume`` continues the same tracker run."""

from __future__ import annotations

import contextlib
import glob
import importlib.util
import json
import os
import time
from pathlib import Path

from .config import Config, ConfigError, flat_config, to_dict
from .io import read_json, reported, write_atomic
from .registry import TRACKERS


class TrackerError(ConfigError):
    """A tracker's store or recorded run that cannot be opened: one line naming the tracker, not its traceback."""


IDS_FILE = "trackers.json"
"""In the run directory: {tracker name: its run id}."""
LOCAL_DIRS = {"wandb": ("wandb", "*-{}"), "mlflow": ("mlruns", "*/{}")}
"""Per tracker: the folder of the run directory it writes (when no server is named) and the pattern, under it, of
the entry that holds the run of a given id (W&B's ``offline-run-<time>-<id>``, MLflow's ``<experiment>/<id>``)."""


MADE = "made_here"
"""In ``trackers.json``: the trackers' folders pst-dist made in the run directory (recorded before the tracker that
makes one opens, so a tracker that fails to open leaves none unaccounted for): its own to log into and for
``--overwrite`` to remove."""


def local_folder(name: str, cfg: Config) -> str | None:
    """The folder of the run directory tracker ``name`` writes under ``cfg``; None when it logs elsewhere (MLflow
    with ``log.mlflow_uri``)."""
    if name not in LOCAL_DIRS or (name == "mlflow" and cfg.log.mlflow_uri):
        return None
    return LOCAL_DIRS[name][0]


def recorded_ids(run_dir: Path) -> dict:
    """``run_dir``'s ``trackers.json`` ({tracker: run id}); {} when there is none or it is not such a mapping."""
    try:
        ids = json.loads((run_dir / IDS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return ids if isinstance(ids, dict) else {}


def tracker_dirs(run_dir: Path, ids: dict | None = None) -> list[str]:
    """The folders of ``run_dir`` that its ``trackers.json`` says pst-dist made (:data:`MADE`) or that hold a
    tracker run it records (``wandb``, ``mlruns``): what ``--overwrite`` removes besides
    :data:`pst_dist.rundir.RUN_FILES`. A ``wandb/`` or ``mlruns/`` there that is neither (the user's own, or one a run
    found there and logged to a server from) is not ours and stays. ``ids``: :func:`recorded_ids`, when read."""
    ids = recorded_ids(run_dir) if ids is None else ids
    made = ids.get(MADE) if isinstance(ids.get(MADE), list) else []
    return [folder for name, (folder, _) in LOCAL_DIRS.items()
            if (run_dir / folder).is_dir() and not (run_dir / folder).is_symlink()
            and (folder in made or holds_tracker_run(run_dir, name, ids.get(name)))]


def holds_tracker_run(run_dir: Path, name: str, run_id) -> bool:
    """Whether ``run_dir``'s folder of tracker ``name`` holds its run ``run_id`` (a string, else False)."""
    folder, pattern = LOCAL_DIRS[name]
    return isinstance(run_id, str) and any((run_dir / folder).glob(pattern.format(glob.escape(run_id))))


def unrecorded_runs(run_dir: Path, name: str, run_id) -> list[str]:
    """The runs in ``run_dir``'s folder of tracker ``name`` other than ``run_id``, the one ``trackers.json`` records
    (a user's logged into it by hand, or a tracker's that failed to open): ``--overwrite`` would remove them with
    the folder. W&B's ``*run-<time>-<id>`` folders (a resume of the same id adds one); MLflow's ``<experiment>/<id>``
    runs, its trash aside."""
    folder = run_dir / LOCAL_DIRS[name][0]
    if name == "wandb":
        found = [p.name for p in folder.glob("*run-*-*") if p.is_dir()]
        return sorted(n for n in found if not (isinstance(run_id, str) and n.endswith(f"-{run_id}")))
    found = [p.parent for p in folder.glob("*/*/meta.yaml") if p.parent.parent.name != ".trash"]
    return sorted(f"{p.parent.name}/{p.name}" for p in found if p.name != run_id)


def check_trackers(names: list[str]) -> None:
    """Refuse a tracker whose package is not installed, naming the extra that installs it."""
    for name in names:
        need = TRACKERS.entry(name).data
        if importlib.util.find_spec(need["package"]) is None:
            raise ConfigError(f"log.trackers: {name!r} needs the {need['package']} package, which is not installed: "
                              f"pip install 'pst-dist[{need['extra']}]'")


def open_trackers(run_dir: Path, cfg: Config) -> list:
    """The trackers ``cfg.log.trackers`` names, each continuing the run ``trackers.json`` records for it (a resume)
    or starting a new one."""
    if not cfg.log.trackers:
        return []
    check_trackers(cfg.log.trackers)
    ids_file = run_dir / IDS_FILE
    ids = read_json(ids_file, "the run's tracker ids", ConfigError) if ids_file.is_file() else {}
    made = list(ids[MADE]) if isinstance(ids.get(MADE), list) else []
    trackers = {}

    def record() -> None:
        write_atomic(ids_file, json.dumps({**ids, **{n: t.id for n, t in trackers.items()},
                                           **({MADE: made} if made else {})}, indent=2))

    try:
        for name in cfg.log.trackers:
            if (folder := local_folder(name, cfg)) and folder not in made and not (run_dir / folder).exists():
                made.append(folder)  # recorded before the tracker makes it
                record()
            try:
                trackers[name] = TRACKERS.load(name)(run_dir, cfg, ids.get(name))
            except ConfigError:
                raise
            except Exception as e:  # noqa: BLE001 - a store gone, unreadable, or without the recorded run
                which = f"the run {ids[name]!r} recorded in {ids_file}" if ids.get(name) else "a new run"
                raise TrackerError(f"log.trackers: {name} could not open {which} ({type(e).__name__}: "
                                   f"{str(e).strip()[:300]})") from e
            record()  # its id at once: a later tracker that fails to open leaves no run here unrecorded
    except BaseException:  # the ones already open end failed (a W&B run left active would take the next run's logs)
        for name, t in trackers.items():
            with reported(f"closing the {name} run after another tracker failed to open"):
                t.close(failed=True)
        raise
    return list(trackers.values())


class WandbTracker:
    """A W&B run in ``<run_dir>/wandb``, offline unless the WANDB_MODE environment variable says otherwise (``wandb
    sync <run_dir>/wandb/offline-run-*`` uploads it later). Project ``log.project``, named after the run directory."""

    def __init__(self, run_dir: Path, cfg: Config, run_id: str | None):
        import wandb  # optional extra (pst-dist[wandb]), imported only when log.trackers names it

        self.run = wandb.init(project=cfg.log.project, name=run_dir.name, dir=str(run_dir), id=run_id,
                              resume="allow" if run_id else None, mode=os.environ.get("WANDB_MODE", "offline"),
                              config=None if run_id else to_dict(cfg),  # once per run: a resume keeps the first
                              settings=wandb.Settings(console="off"),  # stdout stays ours (the summary JSON)
                              reinit="create_new")  # never a run already active in this process (an earlier run's)
        self.id = self.run.id

    def log(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def close(self, failed: bool = False) -> None:
        self.run.finish(exit_code=1 if failed else 0)


class MlflowTracker:
    """An MLflow run in experiment ``log.project`` of the tracking store ``log.mlflow_uri`` names, else of a file
    store in ``<run_dir>/mlruns`` (``mlflow ui --backend-store-uri <run_dir>/mlruns`` shows it); named after the
    run directory, the config as its parameters (dotted keys)."""

    def __init__(self, run_dir: Path, cfg: Config, run_id: str | None):
        from mlflow.entities import Metric, Param  # optional extra (pst-dist[mlflow]), only when log.trackers names it
        from mlflow.tracking import MlflowClient  # the same extra

        self._metric = Metric

        if not cfg.log.mlflow_uri:  # MLflow 3 opens a file store only on request; this one is the run's own
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = MlflowClient(tracking_uri=cfg.log.mlflow_uri or (run_dir / "mlruns").resolve().as_uri())
        # per metric, the last step the run holds: a resume from an earlier checkpoint logs those steps again, and
        # MLflow would keep both (it appends, and cannot delete a point); they are skipped, as W&B drops them
        self.logged: dict[str, int] = {}
        new = run_id is None
        if new:
            exp = self.client.get_experiment_by_name(cfg.log.project)
            exp_id = exp.experiment_id if exp else self.client.create_experiment(cfg.log.project)
            run_id = self.client.create_run(exp_id, run_name=run_dir.name).info.run_id
        else:
            self.client.update_run(run_id, status="RUNNING")
        try:
            if new:
                params = [Param(k, str(v)) for k, v in flat_config(cfg).items()]
                for i in range(0, len(params), 100):  # MLflow takes at most 100 parameters per call
                    self.client.log_batch(run_id, params=params[i: i + 100])
            else:
                for key in self.client.get_run(run_id).data.metrics:
                    self.logged[key] = max(m.step for m in self.client.get_metric_history(run_id, key))
        except BaseException:  # a run this opened never stays RUNNING (unless the store is gone: the error says so)
            with contextlib.suppress(Exception):
                self.client.set_terminated(run_id, status="FAILED")
            raise
        self.id = run_id

    def log(self, step: int, values: dict[str, float]) -> None:
        ms = int(time.time() * 1000)
        metrics = [self._metric(k, float(v), ms, step) for k, v in values.items() if step > self.logged.get(k, -1)]
        if metrics:
            self.client.log_batch(self.id, metrics=metrics)

    def close(self, failed: bool = False) -> None:
        self.client.set_terminated(self.id, status="FAILED" if failed else "FINISHED")
