"""One trial = one Ray Train ``TorchTrainer`` with N workers running ``pst_dist.train.train`` (DeepSpeed when
``[deepspeed]`` is enabled). The Tune trial is a thin driver around it:

- ASHA / FIFO: one ``fit()``; every worker reports each epoch's metrics and checkpoint to Ray Train, and
  ``TuneReportCallback`` forwards them to Tune. A dead worker makes Ray Train restart the worker group from the last
  checkpoint (Train ``FailureConfig``); a dead driver is retried by Tune, and its new ``TorchTrainer`` (same run
  name, same storage) restores the same Train run from its last checkpoint.
- PBT: one ``fit()`` per ``pbt_interval`` epochs, each followed by ``tune.report`` with the checkpoint, so PBT can
  copy a strong trial's weights into a weak one (exploit) before changing its parameters (explore).
- ``tune.attacks`` (:func:`attack_loop`): one run per attack under the trial's run directory, trained epoch by epoch
  in lockstep; one report and one checkpoint (every run's files, each in its attack's subdirectory) per epoch.
"""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path

import torch.distributed as dist

from pst_dist.checkpoint import CheckpointError
from pst_dist.config import Config, from_dict, to_dict
from pst_dist.engine import Engine, engine_class
from pst_dist.rundir import keep_lines_until
from pst_dist.train import train

from .attacks import attack_config, attack_data, trial_runs, worst_case
from .space import trial_config

# metrics.jsonl name -> the name Ray sees (Tune flattens nested keys on '/', so the reported names have none)
REPORTED = {"epoch": "epoch", "eval/val_acc": "val_acc", "eval/test_acc": "test_acc", "train/loss": "train_loss",
            "train/acc": "train_acc", "pst/stage": "stage", "detect/shortcut_gap": "shortcut_gap"}


def _stage_checkpoint(engine: type[Engine], run_dir: Path, epoch: int, rank: int, local_rank: int,
                      parts: tuple[str, ...] = ("",)) -> Path | None:
    """Hard-link the files of this epoch's checkpoint that this process should upload into a fresh directory (the
    engine says which: :meth:`pst_dist.engine.Engine.copy_checkpoint`); ``parts``: the run directories under
    ``run_dir`` to take them from, each into its own subdirectory (a multi-attack trial's runs; "" = ``run_dir``).

    One process per node uploads what its node holds (on one node: rank 0, everything); Ray merges the uploads of
    all workers into one checkpoint directory, which :meth:`pst_dist.engine.Engine.restore_checkpoint` lays back
    into a run directory."""
    if local_rank != 0:
        return None
    stage = run_dir / "ray_upload" / f"epoch{epoch}_rank{rank}"
    shutil.rmtree(stage, ignore_errors=True)
    copied = [engine.copy_checkpoint(run_dir / p, stage / p, primary=rank == 0) for p in parts]
    if rank == 0 and any(copied) and not all(copied):  # a checkpoint missing a run could never be restored
        lacking = [p for p, c in zip(parts, copied, strict=True) if not c]
        raise CheckpointError(f"epoch {epoch}: no checkpoint of {lacking} under {run_dir}")
    return stage if any(copied) else None


def restore_run_dir(layout: type[Engine], source, run_dir: Path, rank: int, local_rank: int, node: str,
                    parts: tuple[str, ...] = ("",)) -> int:
    """Lay the checkpoint ``source`` into the run directory (each of ``parts``, as :func:`_stage_checkpoint` staged
    them): rank 0 first; then, after a barrier, the first process of every other node, only where its node does not
    see rank 0's copy (run directories on node-local disks). A shared run directory is written once, never by two
    nodes at the same time. Returns the epoch the checkpoint was taken at."""
    def restore(d: Path) -> None:
        epoch = min(layout.restore_checkpoint(d / p, run_dir / p) for p in parts)
        with open(run_dir / "restores.jsonl", "a") as f:  # the evidence a fault test looks for
            f.write(json.dumps({"rank": rank, "epoch": epoch, "node_id": node, "from": str(source.path)}) + "\n")
        keep_lines_until(run_dir / "nodes.jsonl", "epoch", epoch)  # the epochs after it are trained again

    def seen_here(d: Path) -> bool:
        try:
            return all(layout.checkpoint_epoch(run_dir / p) == layout.checkpoint_epoch(d / p) for p in parts)
        except CheckpointError:  # a stale or partial checkpoint on this node: restore over it
            return False

    with source.as_directory() as d:
        if rank == 0:
            restore(Path(d))
        if dist.is_initialized():
            dist.barrier()
        if rank != 0 and local_rank == 0 and not seen_here(Path(d)):
            restore(Path(d))  # this node does not see rank 0's run directory (node-local disk)
        if dist.is_initialized():
            dist.barrier()
        return min(layout.checkpoint_epoch(Path(d) / p) or 0 for p in parts)


def worker_loop(loop: dict) -> None:
    """The function every Ray Train worker runs: restore the trial's last checkpoint if there is one, then train,
    reporting each epoch."""
    import ray  # optional heavy dependency (Ray), imported only by tune
    import ray.train  # optional heavy dependency (Ray), imported only by tune
    from ray.train import CheckpointUploadMode  # optional heavy dependency (Ray), imported only by tune

    cfg: Config = from_dict(Config, loop["cfg"])
    run_dir = Path(cfg.log.run_dir)
    layout = engine_class(cfg)  # the engine's checkpoint files in a run directory
    ctx = ray.train.get_context()
    rank, local_rank = ctx.get_world_rank(), ctx.get_local_rank()
    source = ray.train.get_checkpoint()  # set after a worker failure, or when a retried driver restores its run
    if source is None and loop.get("resume_from"):
        source = ray.train.Checkpoint(loop["resume_from"])  # PBT: this trial's (or the exploited trial's) checkpoint
    node = ray.get_runtime_context().get_node_id()
    resume = source is not None
    parts = tuple(trial_runs(cfg)) or ("",)  # the run directories a checkpoint holds: one per attack (and seed)
    start = restore_run_dir(layout, source, run_dir, rank, local_rank, node, parts) if resume else 0

    def report(epoch: int, metrics: dict) -> None:
        if rank == 0:  # where it trained this epoch, at once (Tune's own result files are written later, in batches)
            with open(run_dir / "nodes.jsonl", "a") as f:
                f.write(json.dumps({"epoch": epoch, "node_id": node}) + "\n")
        stage = _stage_checkpoint(layout, run_dir, epoch, rank, local_rank, parts)
        ckpt = ray.train.Checkpoint.from_directory(str(stage)) if stage is not None else None
        # uploaded off the training path; Ray removes the staged hard links once they are in storage (they keep
        # this epoch's bytes: the engines replace checkpoint files by rename, and copy those rewritten in place)
        ray.train.report(metrics, checkpoint=ckpt, checkpoint_dir_name=f"epoch_{epoch:04d}",
                         checkpoint_upload_mode=CheckpointUploadMode.ASYNC)

    def on_epoch(epoch: int, logs: dict, gm, engine) -> None:
        report(epoch, {REPORTED[k]: float(v) for k, v in logs.items() if k in REPORTED})

    if cfg.tune.attacks:
        attack_loop(cfg, loop, run_dir, start, rank, report)
        return
    # the trial directory is the search's own: a retried trial without a checkpoint replaces its partial run; a PBT
    # generation resumes with the settings PBT mutated (train() records each change in the run's meta.json)
    train(cfg, resume=resume, stop_after_epochs=loop.get("stop_after"), on_epoch=on_epoch, overwrite=not resume,
          allow_changes=resume and cfg.tune.scheduler == "pbt")


def attack_loop(cfg: Config, loop: dict, run_dir: Path, start: int, rank: int, report) -> None:
    """A multi-attack trial (``tune.attacks``, :mod:`tune.attacks`), from epoch ``start`` (its restored checkpoint's):
    each epoch, every attack's run (one per seed with ``tune.seeds``) trains that epoch (resuming from its own
    checkpoint), then one ``report``: the worst over the attacks of their validation accuracy (mean over seeds) and
    each attack's figures, with one checkpoint holding every run's."""
    keys = trial_runs(cfg)
    runs = {r: attack_config(cfg, a, s) for r, (a, s) in keys.items()}
    data = {r: attack_data(c, cfg, keys[r][0]) for r, c in runs.items()}  # built once; every epoch's run reads it
    if start == 0 and rank == 0:  # a trial begun again from nothing: its runs are replaced at epoch 1, its records here
        for name in ("nodes.jsonl", "restores.jsonl"):
            (run_dir / name).unlink(missing_ok=True)
    for epoch in range(start + 1, (loop.get("stop_after") or cfg.train.epochs) + 1):
        logs: dict[str, dict] = {}
        for r, c in runs.items():
            def keep(_epoch, epoch_logs, _gm, _engine, r=r, logs=logs):
                logs[r] = epoch_logs
            # epoch 1 of a trial without a checkpoint replaces a partial run (the directory is the search's own);
            # no PBT here (refused with tune.attacks), so a run resumes with its recorded settings
            train(c, resume=epoch > 1, data=data[r], stop_after_epochs=epoch, on_epoch=keep, overwrite=epoch == 1)
        if set(logs) != set(runs):
            raise RuntimeError(f"epoch {epoch}: the runs of {sorted(set(runs) - set(logs))} trained no epoch "
                               f"(their checkpoints are ahead of the trial's)")
        report(epoch, {"epoch": float(epoch), **worst_case(logs, keys)})


def _trainer(cfg: Config, loop: dict, name: str, storage: str, callbacks: list):
    # optional heavy dependency (Ray), imported only by tune
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer  # optional heavy dependency (Ray), imported only by tune

    gpu = cfg.tune.use_gpu == "yes"  # resolved by the search's driver (tune.search.declare_resources)
    resources = {"CPU": cfg.tune.cpus_per_worker, **({"GPU": cfg.tune.gpus_per_worker} if gpu else {})}
    return TorchTrainer(
        worker_loop, train_loop_config=loop,
        scaling_config=ScalingConfig(num_workers=cfg.tune.workers, use_gpu=gpu, resources_per_worker=resources),
        torch_config=TorchConfig(backend="nccl" if gpu else "gloo"),
        run_config=RunConfig(name=name, storage_path=storage, callbacks=callbacks,
                             failure_config=FailureConfig(max_failures=cfg.tune.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)))


def trial_run_config(base: Config, params: dict, search_dir: Path, trial_id: str) -> Config:
    """The training config a trial runs: the trial's schedule, its own run directory (TensorBoard, metrics), an
    evaluation and a checkpoint every epoch (ASHA decides on each epoch's validation accuracy)."""
    cfg = trial_config(base, params)
    cfg.log.run_dir = str(search_dir / "trials" / trial_id)
    cfg.log.progress = False
    cfg.train.eval_every = 1
    cfg.train.checkpoint_every = 1
    return cfg


def run_trial(params: dict, base: dict, search_dir: str) -> None:
    """The Tune trainable (a function trial): build this trial's ``TorchTrainer`` and run it."""
    from ray import tune  # optional heavy dependency (Ray), imported only by tune

    # optional heavy dependency (Ray), imported only by tune
    from ray.tune.integration.ray_train import TuneReportCallback

    base_cfg: Config = from_dict(Config, base)
    trial_id = tune.get_context().get_trial_id()
    cfg = trial_run_config(base_cfg, params, Path(search_dir), trial_id)
    storage = str(Path(search_dir) / "train")
    tune_ckpt = tune.get_checkpoint()
    loop = {"cfg": to_dict(cfg), "resume_from": None}
    if cfg.tune.scheduler != "pbt":
        if tune_ckpt is not None:
            loop["resume_from"] = tune_ckpt.path
        _trainer(cfg, loop, trial_id, storage, [TuneReportCallback()]).fit()
        return
    epoch = 0
    if tune_ckpt is not None:
        loop["resume_from"] = tune_ckpt.path
        with tune_ckpt.as_directory() as d:
            epoch = engine_class(cfg).checkpoint_epoch(Path(d)) or 0
    while epoch < cfg.train.epochs:
        loop["stop_after"] = min(cfg.train.epochs, epoch + cfg.tune.pbt_interval)
        # a fresh Train run per generation (a reused name would restore that run's own last checkpoint)
        result = _trainer(cfg, loop, f"{trial_id}_e{loop['stop_after']}_{uuid.uuid4().hex[:6]}", storage, []).fit()
        epoch = int(result.metrics["epoch"])
        loop["resume_from"] = result.checkpoint.path
        tune.report(dict(result.metrics), checkpoint=tune.Checkpoint(result.checkpoint.path))
