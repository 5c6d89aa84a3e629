"""Run directories: what a new run, ``--resume`` and ``--overwrite`` may do with ``log.run_dir``.

- A new run goes into a directory that holds no run (absent, empty, or with none of the files a run writes).
  A directory that holds a run is refused, naming ``--resume`` and ``--overwrite``; one that holds files named as a
  run's (``meta.json``, ``tb/``, ``wandb/``...) but no config.toml a run recorded is refused whatever the flags.
- ``--overwrite`` removes only the files and folders a run writes (:data:`RUN_FILES`); anything else stays.
- ``--resume`` compares the config with the run's recorded ``config.toml`` and refuses every difference but the
  few that :data:`pst_dist.config.RESUME_MAY_CHANGE` lists; the accepted ones are recorded in ``meta.json``.
"""

from __future__ import annotations

import contextlib
import copy
import errno
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

from .config import (
    RESUME_MAY_CHANGE,
    Config,
    ConfigError,
    absolute_paths,
    auto_meaning,
    config_changes,
    device_type,
    flat_config,
    load_config,
    tomllib,
)
from .io import CheckpointError, _machine, json_lines, read_json, uncreatable, write_atomic
from .tracking import IDS_FILE, LOCAL_DIRS, holds_tracker_run, local_folder, recorded_ids, tracker_dirs, unrecorded_runs

RUN_MARKERS = ("config.toml", "checkpoint.pt", "ds_checkpoint", "summary.json", "metrics.jsonl")
"""Any of these in a directory means it holds a run."""
OUTSIDE_DATA = "outside_data.json"
"""Written into a run directory by a script that trains it on data its config does not describe (e.g.
launch/projection_screen.py's projected images): ``--resume``, ``pst-dist eval`` and ``export`` refuse the run
(:func:`check_own_data`), for its config would rebuild other data."""
RUN_FILES = (*RUN_MARKERS, "meta.json", "tb", "restores.jsonl", "nodes.jsonl", "ray_upload", "trackers.json",
             OUTSIDE_DATA)
"""Everything a run writes into its directory (what ``--overwrite`` removes, and nothing else), but the trackers'
folders: ``wandb/`` and ``mlruns/`` are removed only when they hold the tracker runs ``trackers.json`` records
(:func:`pst_dist.tracking.tracker_dirs`)."""


class RunDirError(ConfigError):
    """``log.run_dir`` cannot be used as asked; the message names it and the way out."""


def _writable_ancestor(path: Path) -> None:
    """Refuse a run directory that could not be created: an ancestor that is a file, or not writable."""
    if (problem := uncreatable(path)) is not None:
        raise RunDirError(f"log.run_dir={str(path)!r}: {problem}")


def holds_run(run_dir: Path) -> list[str]:
    """The run files present in ``run_dir`` (empty when it holds no run)."""
    return [n for n in RUN_MARKERS if (run_dir / n).exists()]


def run_names_present(run_dir: Path, trackers: list[str] = ()) -> list[str]:
    """Every name in ``run_dir`` that a run with ``trackers`` writes (:data:`RUN_FILES` and those trackers' folders;
    not :data:`OUTSIDE_DATA`, which a script writes before the run it describes): a directory holding any of them
    without a recorded config is not a run's, and a run would write over them (and ``--overwrite`` later remove
    them). A tracker's folder the run does not log to is left to its owner."""
    names = (*RUN_FILES, *(LOCAL_DIRS[t][0] for t in trackers if t in LOCAL_DIRS))
    return [n for n in names if n != OUTSIDE_DATA and ((run_dir / n).exists() or (run_dir / n).is_symlink())]


RUN_SECTIONS = ("data", "model", "train", "schedule", "log")
"""Tables every config.toml a run records has (:func:`pst_dist.config.dump_toml` writes them all)."""


def is_recorded_config(f: Path) -> bool:
    """Whether ``f`` is a config pst-dist recorded: TOML with a run's tables. (Not a full :func:`load_config`: one
    recorded by an older pst-dist stays one even where its keys no longer load.)"""
    try:
        raw = tomllib.loads(Path(f).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return False
    return all(isinstance(raw.get(t), dict) for t in RUN_SECTIONS)


def run_meta(run_dir: Path) -> dict | None:
    """The run's meta.json as an object, or None (missing, unreadable, not an object)."""
    try:
        meta = json.loads((Path(run_dir) / "meta.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def meta_segments(meta: dict) -> list[dict]:
    """The segments of a run's meta.json: the first (the object itself) and each resume in its ``resumes`` list
    (entries that are not objects passed over)."""
    resumes = meta.get("resumes") if isinstance(meta.get("resumes"), list) else []
    return [meta, *(m for m in resumes if isinstance(m, dict))]


def recorded_inputs(run_dir: Path) -> dict | None:
    """The inputs meta.json records for the model (:func:`pst_dist.train.write_run_header`; the first segment's,
    else the latest resume's; None for runs from before it did), with the data check's values when a stage asked
    for it (``spectral_check``)."""
    f = run_dir / "meta.json"
    meta = read_json(f, "the run's meta.json", CheckpointError) if f.is_file() else {}
    first, *resumes = meta_segments(meta)
    inputs = next((m["inputs"] for m in (first, *reversed(resumes)) if m.get("inputs")), None)
    if inputs is not None:
        _check_inputs(inputs, f)
    return inputs


def _check_inputs(inputs, f: Path) -> None:
    """CheckpointError naming ``f`` unless ``inputs`` holds what the model is rebuilt from
    (:func:`pst_dist.train.model_inputs`): num_classes >= 1, shape [C, H, W] of positive ints, and C finite means
    and positive stds."""
    def count(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= 1

    def numbers(v, positive: bool) -> bool:
        return (isinstance(v, list) and len(v) == shape[0] and all(
            isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x) and (x > 0 or not positive)
            for x in v))

    shape = inputs.get("shape") if isinstance(inputs, dict) else None
    ok = (isinstance(shape, list) and len(shape) == 3 and all(count(x) for x in shape)
          and count(inputs.get("num_classes")) and numbers(inputs.get("mean"), False)
          and numbers(inputs.get("std"), True))
    if not ok:
        raise CheckpointError(f"{f}: its inputs {inputs!r:.300} are not a run's (num_classes, shape [C, H, W], C "
                              f"means and C positive stds)")


def resumed_inputs(run_dir: Path) -> dict:
    """:func:`recorded_inputs` for a resume: {} when there are none, or meta.json cannot be read (the resume's
    header writes a new one)."""
    try:
        return recorded_inputs(run_dir) or {}
    except CheckpointError:
        return {}


def written_by_a_run(run_dir: Path) -> bool:
    """Whether ``run_dir``'s run files are a pst-dist run's: the meta.json a run writes first names the library
    versions, and its config.toml, unless the run was cut short before writing it, is :func:`is_recorded_config` (a
    user's own recipe kept as config.toml has every table too, and ``--overwrite`` would have replaced it)."""
    meta, config = run_meta(run_dir), run_dir / "config.toml"
    return meta is not None and isinstance(meta.get("versions"), dict) and (
        not (config.exists() or config.is_symlink()) or is_recorded_config(config))


def _damaged_record(run_dir: Path) -> str | None:
    """Why the config.toml beside a run's meta.json (library versions and all) cannot be read, or None: a run's
    record damaged since (a truncated copy, an editor), not a user's folder."""
    meta, config = run_meta(run_dir), run_dir / "config.toml"
    if meta is None or not isinstance(meta.get("versions"), dict) or not config.is_file():
        return None
    try:
        raw = tomllib.loads(config.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        return f"not valid TOML: {e}"
    lost = [f"[{t}]" for t in RUN_SECTIONS if not isinstance(raw.get(t), dict)]
    return f"no {' '.join(lost)} table: cut short?" if lost else None


def check_own_data(run_dir: Path, what: str) -> None:
    """Refuse (RunDirError, naming ``what``) a run trained on data its config does not describe (:data:`OUTSIDE_DATA`
    in its directory)."""
    f = Path(run_dir) / OUTSIDE_DATA
    if f.exists() or f.is_symlink():
        try:
            said = json.loads(f.read_text(encoding="utf-8")).get("what", "")
        except (OSError, ValueError, AttributeError):
            said = ""
        raise RunDirError(f"{what}: {run_dir} was trained on data its config does not describe ({f}"
                          f"{': ' + str(said) if said else ''}); its config would rebuild other data")


def check_run_dir(cfg: Config, resume: bool, overwrite: bool, allow_changes: bool = False) -> dict[str, tuple]:
    """Validate ``cfg.log.run_dir`` for a new run, a resume or an overwrite before any work is done. Returns the
    config changes a resume accepts ({key: (recorded, now)}; empty otherwise). ``allow_changes``: accept any change
    (a PBT trial adopting another trial's checkpoint with mutated settings); they are still recorded."""
    run_dir = Path(cfg.log.run_dir)
    if resume and overwrite:
        raise RunDirError("--resume and --overwrite together: continue the run or replace it, not both")
    if run_dir.is_symlink() and not run_dir.is_dir() or run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"log.run_dir={str(run_dir)!r}: exists and is not a directory")
    _writable_ancestor(run_dir)
    theirs = run_names_present(run_dir, cfg.log.trackers) if run_dir.is_dir() else []
    present = [n for n in theirs if n in RUN_MARKERS]  # holds_run's answer, read once
    if theirs and not written_by_a_run(run_dir):
        if problem := _damaged_record(run_dir):
            raise RunDirError(f"log.run_dir={str(run_dir)!r} holds a pst-dist run whose config.toml is damaged "
                              f"({problem}): pst-dist neither resumes nor replaces a run whose record it cannot "
                              f"read; restore config.toml, or choose another log.run_dir")
        raise RunDirError(f"log.run_dir={str(run_dir)!r} holds {', '.join(theirs)}, which a run writes, but no "
                          f"pst-dist run wrote them (no config.toml with a run's [{'], ['.join(RUN_SECTIONS)}] "
                          f"tables beside the meta.json a run writes): pst-dist neither overwrites nor resumes from "
                          f"them; choose another log.run_dir")
    ids = recorded_ids(run_dir) if theirs else {}
    ours = tracker_dirs(run_dir, ids) if theirs else []
    for name in cfg.log.trackers:
        if (folder := local_folder(name, cfg)) is None:
            continue
        run_id = ids.get(name)
        if resume and name == "mlflow" and isinstance(run_id, str) and not holds_tracker_run(run_dir, name, run_id):
            raise RunDirError(f"log.run_dir={str(run_dir)!r}: the mlflow run {run_id!r} its {IDS_FILE} records is "
                              f"not in its {folder}/ (deleted from the store?), so the resume cannot continue it. "
                              f"Leave mlflow out of log.trackers, or start a new run (another log.run_dir)")
        # W&B starts a recorded id anew when its offline folder was cleaned; a folder no run of this tracker used is
        # not pst-dist's
        if folder in theirs and folder not in ours and not isinstance(run_id, str):
            raise RunDirError(f"log.run_dir={str(run_dir)!r} holds {folder}/, but no {name} run this run recorded "
                              f"(its {IDS_FILE}): log.trackers={cfg.log.trackers} would log into a store pst-dist did "
                              f"not make, and a later --overwrite remove it; move {folder}/ away or choose another "
                              f"log.run_dir")
    if not resume:
        for name, (folder, _) in LOCAL_DIRS.items() if present and overwrite else ():
            if folder in ours and (others := unrecorded_runs(run_dir, name, ids.get(name))):
                raise RunDirError(f"--overwrite: log.run_dir={str(run_dir)!r}'s {folder}/ holds {name} runs its "
                                  f"{IDS_FILE} does not record ({', '.join(others[:5])}"
                                  f"{', ...' if len(others) > 5 else ''}: a user's, or a tracker's that failed to "
                                  f"open), which replacing the run would remove with the folder; move them out of "
                                  f"{folder}/ first, or choose another log.run_dir")
        if present and not overwrite:
            raise RunDirError(f"log.run_dir={str(run_dir)!r} already holds a run ({', '.join(present)}): pass "
                              f"--resume to continue it, --overwrite to replace it (only the run's own files are "
                              f"removed), or choose another log.run_dir")
        return {}
    check_own_data(run_dir, "--resume")
    recorded_file = run_dir / "config.toml"
    if not recorded_file.is_file():
        what = "no checkpoint" if not {"checkpoint.pt", "ds_checkpoint"} & set(present) else "no config.toml"
        raise RunDirError(f"--resume: {what} to resume from at {run_dir}")
    try:
        recorded = load_config(recorded_file, recorded=True)
    except ConfigError as e:
        raise RunDirError(f"--resume: the run's recorded config cannot be read ({e})") from None
    changes, refused = resume_changes(recorded, cfg, RESUME_MAY_CHANGE, trained_on(run_dir))
    moved = relocations(run_dir, refused)
    refused = {k: v for k, v in refused.items() if k not in moved}
    if refused and not allow_changes:
        stuck = [k for k in RELOCATABLE if k in refused]
        why = (f" ({' and '.join(stuck)} may name another path only where the run recorded what the path held: "
               f".beton files, a poison read from files, which the resume then checks; this run's record does not: "
               f"keep its data where it was)" if stuck else "")
        raise RunDirError(f"--resume: the config differs from the one {run_dir} was trained with "
                          f"({listed_changes(refused)}). A resumed run must train what its record says; only "
                          f"{', '.join(RESUME_MAY_CHANGE)} may change{why}. Start a new run (another log.run_dir) "
                          f"for other settings")
    if recorded.train.epochs > cfg.train.epochs:
        raise RunDirError(f"--resume: train.epochs={cfg.train.epochs} is fewer than the run's recorded "
                          f"{recorded.train.epochs}: resume with at least as many epochs")
    return changes


RELOCATABLE = {"data.root": "each .beton split's SHA-256, the files hashed now",
               "poison.path": "the poisoned training images' fingerprint"}
"""The paths a resume accepts as changed where the run recorded what they held (:func:`relocations`), and the check
that then decides, in words."""


def relocations(run_dir: Path, changes: dict) -> set[str]:
    """Which of the path ``changes`` ({key: (recorded, now)}) a resume of the run in ``run_dir`` accepts: those whose
    content the run recorded (meta.json's ``inputs``), so that the data read from the new path is checked against
    the record before the run writes anything (the same files copied to another disk or mount, say a node's local
    SSD). ``data.root`` with .beton files (each split's SHA-256, hashed again on a move:
    :func:`pst_dist.data.pipeline.check_same_beton`); ``poison.path`` with the poisoned training images'
    fingerprint (``inputs.poison_sha256``: :func:`pst_dist.data.pipeline.check_same_poison`). Returns those keys
    (the checks in words: :data:`RELOCATABLE`). Other sources keep their path: an image folder's record is its listing
    (names, sizes, times), not its content, and the in-memory ones (IDX, CIFAR batches) record nothing of their
    files."""
    try:
        inputs = recorded_inputs(run_dir) or {}
    except CheckpointError:  # unreadable: the resume reads no record either (resumed_inputs), so it checks nothing
        return set()
    recorded = {"data.root": isinstance(inputs.get("beton"), dict) and bool(inputs["beton"]),
                "poison.path": isinstance(inputs.get("poison_sha256"), str)}
    return {k for k in RELOCATABLE if k in changes and recorded[k]}


def resume_from_scratch(run_dir: Path) -> bool:
    """``--resume`` of a run with no checkpoint to load (its engine found none): True when the run was stopped
    before its first was written (preempted in its first epoch, before checkpoint_every epochs, or while that
    checkpoint was being saved: the epoch's metrics are logged just before), so it starts again from epoch 0 and
    loses nothing it could have resumed; RunDirError when it had one (it ended, a segment resumed from one, or its
    metrics log an epoch after the first checkpoint's, which only a completed save lets begin): removed since, and
    starting again would replace a run's results, which only ``--overwrite`` does."""
    from .engine.deepspeed import CHECKPOINT_DIR, checkpoint_tags  # start-up time: torch, only on this resume

    tags = [p.name for p in checkpoint_tags(run_dir / CHECKPOINT_DIR)]
    if len(tags) > 1:  # 'latest' names a tag once its save is complete and on disk: one of these once was
        raise RunDirError(f"--resume: {run_dir / CHECKPOINT_DIR} holds {', '.join(tags)} but its 'latest' names "
                          f"none (lost or emptied, say by a power loss): write the newest complete tag's name into "
                          f"ds_checkpoint/latest to resume from it, or --overwrite to start the run again")
    meta = run_meta(run_dir)
    resumed = meta is not None and len(meta_segments(meta)) > 1
    logged, first = _epochs_logged(run_dir), _first_checkpoint_epoch(run_dir)
    why = ("it ended (summary.json)" if (run_dir / "summary.json").exists() else "a segment resumed from one"
           if resumed else f"its metrics.jsonl logs epoch {logged}, after its first checkpoint's (epoch {first})"
           if logged > first else None)
    if why is not None:
        raise RunDirError(f"--resume: {run_dir} holds no checkpoint, but had one ({why}): removed? Nothing to resume "
                          f"from; --overwrite starts the run again (only its own files are removed), or choose "
                          f"another log.run_dir")
    return True


def _epochs_logged(run_dir: Path) -> int:
    """The last epoch metrics.jsonl logs as finished (0: none; a line torn by a kill is passed over)."""
    f = run_dir / "metrics.jsonl"
    if not f.is_file():
        return 0
    epochs = [row.get("epoch") for _, row in json_lines(f)]
    return max((e for e in epochs if isinstance(e, int) and not isinstance(e, bool)), default=0)


def _first_checkpoint_epoch(run_dir: Path) -> int:
    """The epoch the run recorded in ``run_dir`` writes its first checkpoint after (train.checkpoint_every, or its
    last epoch); 1 when its record cannot be read (any epoch logged after the first then counts as checkpointed)."""
    try:
        t = load_config(run_dir / "config.toml", recorded=True).train
    except (ConfigError, OSError):
        return 1
    return min(t.checkpoint_every, t.epochs) if t.checkpoint_every else t.epochs


def resume_changes(recorded: Config, cfg: Config, may_change: tuple[str, ...],
                   was: str | None = None) -> tuple[dict, dict]:
    """What a resume under ``cfg`` changes against the ``recorded`` config ("auto" compared by what it means: here,
    and for the record on ``was``, the device type it trained on, else here too; the record may predate a default):
    (every change {key: (recorded, now)}, those outside ``may_change`` (keys or whole sections); a message lists
    them with :func:`listed_changes`). data.root and poison.path are compared made absolute from this working
    directory."""
    here = device_type(cfg)
    recorded, cfg = copy.deepcopy(recorded), copy.deepcopy(cfg)
    for c in (recorded, cfg):  # paths compared by what they name from here (a record from before they were absolute)
        absolute_paths(c)
    changes = config_changes(auto_meaning(flat_config(recorded), was or here), auto_meaning(flat_config(cfg), here))
    refused = {k: v for k, v in changes.items() if not any(k == m or k.startswith(m + ".") for m in may_change)}
    return changes, refused


def listed_changes(changes: dict) -> str:
    """``{key: (recorded, now)}`` for a message: ``key: recorded -> now; ...``."""
    return "; ".join(f"{k}: {was!r} -> {now!r}" for k, (was, now) in changes.items())


def trained_on(run_dir: Path) -> str | None:
    """The device type (cpu | cuda) the run in ``run_dir`` last trained on, as its meta.json's segments resolved it;
    None when it does not say (a run from before meta.json recorded it)."""
    meta = run_meta(run_dir)
    for segment in reversed(meta_segments(meta) if meta is not None else []):
        resolved = segment.get("resolved")
        device = resolved.get("device") if isinstance(resolved, dict) else None
        if isinstance(device, str) and device:
            return "cuda" if device.startswith("cuda") else "cpu"
    return None


def remove_run_files(run_dir: Path) -> list[str]:
    """``--overwrite``: remove the files and folders a run writes (:data:`RUN_FILES`), nothing else, and only when
    the directory holds a pst-dist run (:func:`written_by_a_run`): a user's own ``tb/``, ``meta.json`` or
    ``config.toml`` in a directory without one is never touched."""
    removed: list[str] = []
    if not run_dir.is_dir() or not holds_run(run_dir) or not written_by_a_run(run_dir):
        return removed
    last = ("trackers.json", "config.toml")  # what says whose the rest is goes last: a kill part-way leaves a run
    names = (*tracker_dirs(run_dir), *(n for n in RUN_FILES if n not in last), *last)  # --overwrite can redo
    for name in names:  # the trackers' folders first: trackers.json names them
        p = run_dir / name
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.exists() or p.is_symlink():
            p.unlink()
        else:
            continue
        removed.append(name)
    return removed


def keep_metrics_until(run_dir: Path, step: int) -> list[dict]:
    """On resume: drop metrics.jsonl lines logged after the checkpoint's step (they are logged again), so the file
    holds each step once; the rows it keeps at that step itself (:class:`pst_dist.metrics.Metrics` does not log
    them again)."""
    return [r for r in keep_lines_until(run_dir / "metrics.jsonl", "step", step) if r.get("step") == step]


def keep_lines_until(f: Path, key: str, last: int) -> list[dict]:
    """Drop the lines of the JSON-lines file ``f`` whose ``key`` is past ``last`` (a resumed or restored run writes
    them again), and lines torn by a kill; nothing when ``f`` does not exist. The rows kept."""
    if not f.is_file():
        return []
    kept, rows = [], []
    for line, row in json_lines(f):  # a line torn by a kill is dropped: the run logs it again
        if row.get(key, 0) <= last:
            kept.append(line + "\n")
            rows.append(row)
    write_atomic(f, "".join(kept))
    return rows


# ---------------------------------------------------------------------------------------------------------------
# one process trains into a run directory at a time

LOCK = ".pst-dist.lock"
"""The file a training process holds locked in its run directory while it trains (:class:`RunLock`); not a run
file."""
NO_LOCKS = (errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL, errno.ENOLCK)
"""``flock``'s errors on a file system that gives no file locks (some FUSE ones, Lustre without ``-o flock``, NFS
without its lock daemon)."""
LOCK_WAIT_S = 30.0
"""How long a training waits for another process's lock on its run directory before it is refused (a process
being killed, or a Ray worker group being replaced, still holds it for a moment)."""


class RunLock:
    """``log.run_dir``'s lock while this process trains into it: two trainings of one run directory at once (a queue
    script started twice, a job launched again while its first launch still runs) would write their checkpoints,
    metrics and summary over each other's. The lock is the kernel's (``flock`` on :data:`LOCK`, a file that names its
    holder: machine, process, since when), so a holder that is killed (SIGKILL, the OOM killer) lets it go with
    its process (on NFS, the server for a lost node, when it gives up that node's locks). A lock held elsewhere is
    waited for up to :data:`LOCK_WAIT_S` seconds, then refused (RunDirError naming its holder). Where the file system
    has no locks, the run goes on unlocked, said once. :meth:`release` removes the file while holding it: a process that
    locks the removed file meanwhile sees it is no longer the one at its path and opens it again."""

    def __init__(self, run_dir: Path, log=lambda m: print(m, file=sys.stderr)):
        self.path = Path(run_dir) / LOCK
        self.fd: int | None = None
        self.made = [d for d in (Path(run_dir), *Path(run_dir).parents) if not d.exists()]  # deepest first
        try:
            self._take(log)
        except BaseException:
            self.release()
            raise

    def _take(self, log) -> None:
        import fcntl  # POSIX only: pst-dist runs on Linux

        deadline = None
        for _ in range(10_000):  # ends by taking it, or by the deadline (the lock removed under it again and again)
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except FileNotFoundError:  # a parallel job removed an empty parent between the two
                continue
            except OSError as e:
                raise RunDirError(f"log.run_dir={str(self.path.parent)!r}: cannot create its lock {self.path} "
                                  f"({e.strerror or e})") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                self.fd = fd  # at once: what release() lets go of, whatever comes next
            except BlockingIOError:
                holder = self._said(fd)
                os.close(fd)
                if deadline is None:
                    deadline = time.monotonic() + LOCK_WAIT_S
                    log(f"[run] {self.path} is held by {_who(holder)}: waiting up to {LOCK_WAIT_S:.0f} s for it")
                if time.monotonic() >= deadline:
                    raise RunDirError(f"log.run_dir={str(self.path.parent)!r}: {_who(holder)} is training into it "
                                      f"(since {holder.get('since', '?')}; its lock {self.path}). Two runs in one "
                                      f"directory would write their checkpoints and metrics over each other's: wait "
                                      f"for it to end, or choose another log.run_dir") from None
                time.sleep(0.25)
                continue
            except OSError as e:
                os.close(fd)
                if e.errno in (errno.ESTALE, errno.ENOENT):  # removed (NFS) while this one opened it: again
                    continue
                if e.errno not in NO_LOCKS:
                    raise RunDirError(f"log.run_dir={str(self.path.parent)!r}: cannot lock {self.path} "
                                      f"({e.strerror or e})") from None
                # the file may be another process's lock on a file system that has none to give: left as it is
                log(f"[run] {self.path.parent}: the file system gives no file locks ({e.strerror or e}): a second "
                    f"training of this run directory would not be stopped")
                return
            if not self._holds_path():  # removed by the holder that released it while this one waited: again
                os.close(fd)
                self.fd = None
                continue
            earlier = self._said(fd)
            if earlier:
                log(f"[run] {self.path}: {_who(earlier)} held it until it was killed (it no longer runs); taken over")
            me = {"machine": _machine(), "pid": os.getpid(), "since": _now()}
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
            return
        raise RunDirError(f"log.run_dir={str(self.path.parent)!r}: its lock {self.path} keeps being replaced")

    @staticmethod
    def _said(fd: int) -> dict:
        """What the lock file says of its holder ({} while it is being written, or when it is not ours)."""
        try:
            said = json.loads(os.pread(fd, 4096, 0) or b"{}")
        except (OSError, ValueError):
            return {}
        return said if isinstance(said, dict) else {}

    def _holds_path(self) -> bool:
        """Whether the file this lock holds is still the one at its path (not removed or replaced, the run directory
        not moved)."""
        try:
            held, there = os.fstat(self.fd), os.stat(self.path)
        except (OSError, TypeError):
            return False
        return (held.st_dev, held.st_ino) == (there.st_dev, there.st_ino)

    def release(self) -> None:
        """Remove the lock file, if the path still names the one held, and let the lock go (once; never raises), and
        the folders taking it made if they are still empty (a run refused or failed before writing anything leaves no
        folder)."""
        if self.fd is not None:
            if self._holds_path():  # not another process's, made there after this run's directory was moved
                with contextlib.suppress(OSError):
                    self.path.unlink()  # while holding it (see the class)
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = None
        for d in self.made:
            with contextlib.suppress(OSError):
                d.rmdir()


def _who(said: dict) -> str:
    where = "this machine" if said.get("machine") == _machine() else said.get("machine") or "another machine"
    return f"process {said['pid']} on {where}" if "pid" in said else "another process"


def _now() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S %Z")


_HELD: dict[str, RunLock] = {}
_KEPT: set[str] = set()
"""Run directories whose lock :func:`run_dir_held` keeps across the trainings inside it."""


@contextlib.contextmanager
def run_dir_held(run_dir: Path):
    """Hold ``run_dir``'s lock for a command that writes files of its own beside a training into it (``diagnose``
    replaces its plot, rows and TensorBoard events before it trains into ``--out/run``): the lock is taken before
    the first of them, and :func:`lock_run_dir` / :func:`unlock_run_dir` inside keep it."""
    lock_run_dir(run_dir)
    _KEPT.add(str(run_dir))
    try:
        yield
    finally:
        _KEPT.discard(str(run_dir))
        unlock_run_dir(run_dir)


def lock_run_dir(run_dir: Path) -> None:
    """Take ``run_dir``'s :class:`RunLock` for this process until :func:`unlock_run_dir` (RunDirError while another
    process trains into it). One this process still holds (a run interrupted before it let go) is let go first,
    unless :func:`run_dir_held` keeps it."""
    if str(run_dir) in _KEPT and str(run_dir) in _HELD:
        return
    unlock_run_dir(run_dir)
    try:
        _HELD[str(run_dir)] = RunLock(Path(run_dir))
    except OSError as e:  # a ConfigError reaches every rank (train's _on_every_rank); an OSError would not
        raise RunDirError(f"log.run_dir={str(run_dir)!r}: cannot take its lock ({e.strerror or e})") from None


def unlock_run_dir(run_dir: Path) -> None:
    """Release the lock :func:`lock_run_dir` took, if this process holds it (and :func:`run_dir_held` does not)."""
    if str(run_dir) not in _KEPT and (lock := _HELD.get(str(run_dir))) is not None:
        lock.release()
        _HELD.pop(str(run_dir), None)


def _close_held_in_child() -> None:
    """A process forked while a run holds its lock (a DataLoader worker) shares it: it lets go of its own copy, so
    that the lock ends with the process that trains (a stuck worker would otherwise keep it)."""
    for lock in _HELD.values():
        if lock.fd is not None:
            with contextlib.suppress(OSError):
                os.close(lock.fd)
            lock.fd = None


os.register_at_fork(after_in_child=_close_held_in_child)
