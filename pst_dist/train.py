"""The training loop, top to bottom: schedule -> freeze -> forward/backward -> step -> log -> eval/checkpoint.

Setup lives in small ``build_*`` functions. The loop takes any iterable of (uint8 images, labels) batches with a
``set_epoch`` method (optional) and a length, so FFCV or DeepSpeed data paths plug in without touching it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import random
import resource
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
from torchvision.utils import make_grid
from tqdm import tqdm

from .checkpoint import CheckpointError
from .config import Config, ConfigError, DeepSpeedConfig, TriggerConfig, auto_meaning, dump_toml
from .data.pipeline import (
    Data,
    Normalize,
    beton_digests,
    build_data,
    build_loader,
    check_same_beton,
    check_same_folder,
    check_same_poison,
)
from .data.sources import Split, fingerprint
from .defenses import pgd_examples, step_seed, ueraser_loss, ueraser_repeats
from .distributed import DistInfo, broadcast_buffers, build_device, init_distributed, mean_across_ranks, teardown
from .engine import DeepSpeedEngine, TorchEngine, build_engine, engine_class
from .io import OutputError, read_json, remove_stale, reported, write_atomic
from .metrics import Metrics, git_sha, library_versions, machine_facts
from .models import build_model
from .pst.detectors import (
    equalize_spectra,
    mean_shift_values,
    over_noise,
    probe_metrics,
    spectral_values,
    subtract_mean_shift,
    trigger_value,
)
from .pst.freeze import GroupedModel, param_groups, set_group_lrs, trace_units
from .pst.groups import layer_groups
from .pst.losses import mix_batch, stage_loss
from .pst.schedule import ActiveStage, Schedule, lr_factor
from .pst.views import apply_view
from .rundir import (
    RELOCATABLE,
    RUN_FILES,
    RunDirError,
    check_run_dir,
    holds_run,
    lock_run_dir,
    meta_segments,
    remove_run_files,
    resume_from_scratch,
    resumed_inputs,
    unlock_run_dir,
)
from .tracking import check_trackers


def build_optimizer(cfg: Config, model: nn.Module, gm: GroupedModel) -> torch.optim.Optimizer:
    """SGD (Nesterov) or AdamW, one param group per layer group; the fused CUDA kernels when the model is on a GPU
    (one launch per step instead of one per tensor; the CPU keeps the default, bit-identical to earlier runs)."""
    groups = param_groups(model, gm.groups, cfg.train.lr, cfg.train.weight_decay)
    fused = {"fused": True} if next(model.parameters()).is_cuda and not cfg.deepspeed.enabled else {}
    if cfg.train.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.train.lr, momentum=0.9, nesterov=True, **fused)
    return torch.optim.AdamW(groups, lr=cfg.train.lr, **fused)


@torch.no_grad()
def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, normalize: Normalize,
             device: torch.device, batch_size: int = 512, views: Sequence[str] = ()) -> float:
    """Accuracy of ``model`` on uint8 ``images``; with ``views`` (schedule.eval_views), of the mean softmax over the
    raw image and those views of it."""
    model.eval()
    correct = torch.zeros((), dtype=torch.long, device=device)
    for i in range(0, len(labels), batch_size):
        x = images[i: i + batch_size].to(device, non_blocking=True).float() / 255
        y = labels[i: i + batch_size].to(device, non_blocking=True)
        correct += (predict(model, x, normalize, views).argmax(1) == y).sum()
    return int(correct) / max(1, len(labels))


def predict(model: nn.Module, x: torch.Tensor, normalize: Normalize, views: Sequence[str] = ()) -> torch.Tensor:
    """Class scores of the float [0, 1] batch ``x``: the logits, or with ``views`` the mean softmax over ``x`` and
    each view of it (:func:`pst_dist.pst.views.apply_view`)."""
    if not views:
        return model(normalize(x))
    probs = model(normalize(x)).float().softmax(1)
    for view in views:
        probs += model(normalize(apply_view(x, view))).float().softmax(1)
    return probs / (1 + len(views))


def write_run_header(run_dir: Path, cfg: Config, resumed_at: int | None = None,
                     changes: dict[str, tuple] | None = None, resolved: dict | None = None,
                     inputs: dict | None = None, device: torch.device | None = None) -> None:
    """config.toml (what trains from now on) and meta.json (git SHA, versions, this rank's ``machine``:
    :func:`pst_dist.metrics.machine_facts` on ``device``; argv, what ``auto`` settings
    resolved to on this machine, the ``inputs`` the model was built for (classes, image shape, normalisation: what
    ``pst-dist eval`` and ``export`` rebuild it from); on a resume, appended to its ``resumes`` list: the epoch resumed
    from and every config key that changed, so the record never hides it)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    meta = {"git_sha": git_sha(), "versions": library_versions(), "machine": machine_facts(device), "argv": sys.argv,
            "resolved": resolved or {}, "inputs": inputs or {}}
    if resumed_at is not None:
        old = run_dir / "meta.json"
        try:
            first = json.loads(old.read_text(encoding="utf-8")) if old.is_file() else {}
        except (json.JSONDecodeError, UnicodeDecodeError):
            first = {}
        first = first if isinstance(first, dict) else {}
        resumes = list(first.get("resumes", []))
        note_other_kernels(meta_segments(first), resumed_at, meta["machine"])
        resumes.append({"epoch": resumed_at, "changes": {k: list(v) for k, v in (changes or {}).items()}, **meta})
        meta = {**first, "resumes": resumes}
    write_atomic(run_dir / "meta.json", json.dumps(meta, indent=2))  # first: a run cut short after it is still one
    write_atomic(run_dir / "config.toml", dump_toml(cfg))  # (rundir.written_by_a_run)


def note_other_kernels(segments: list, resumed_at: int, now: dict) -> None:
    """Say on stderr when the segment that saved the checkpoint resumed from at epoch ``resumed_at`` (the last of
    meta.json's ``segments``, its first and its resumes, that started before it: a resume that stopped before saving
    made nothing) computed with other kernels than ``now`` (another CPU, capability, GPU or
    :data:`pst_dist.metrics.KERNEL_ENV` variable): the run goes on correctly, but not bit for bit as an uninterrupted
    one would. Runs from before meta.json recorded ``machine`` say nothing."""
    was = next((m["machine"] for m in reversed(segments) if isinstance(m, dict) and isinstance(m.get("machine"), dict)
                and isinstance(m.get("epoch", 0), int) and m.get("epoch", 0) < resumed_at), None)
    keys = ("cpu", "cpu_capability", "gpu", "env")
    if was is not None and any(was.get(k) != now.get(k) for k in keys):
        then, here = ({k: m.get(k) for k in keys if m.get(k)} for m in (was, now))
        print(f"[resume] this machine's kernels differ from those the run computed with until now ({then} then, "
              f"{here} now): it trains on correctly, but not bit for bit as an uninterrupted run would",
              file=sys.stderr)


def started_normalisation(inputs: dict, data: Data, is_primary: bool = True) -> Data:
    """On a resume, ``data`` normalised as the run was (its recorded ``inputs``) when the figures computed now
    differ: a resumed run trains on with what trained it (an image folder's figures, for one, changed in their last
    float32 bits when they became exact sums). Says so on stderr when they differ."""
    if "mean" not in inputs or "std" not in inputs:
        return data
    mean, std = torch.tensor(inputs["mean"], dtype=torch.float32), torch.tensor(inputs["std"], dtype=torch.float32)
    if mean.shape != data.mean.shape or (torch.equal(mean, data.mean) and torch.equal(std, data.std)):
        return data
    if is_primary:
        print(f"[data] --resume: normalising with the mean/std the run started with ({inputs['mean']}, "
              f"{inputs['std']}); computed now: ({data.mean.tolist()}, {data.std.tolist()})", file=sys.stderr)
    return dataclasses.replace(data, mean=mean, std=std)


def model_inputs(data: Data) -> dict:
    """What the model is built for (meta.json's ``inputs``): classes, image shape [C, H, W], normalisation; and for
    an image folder, its listing's fingerprint and file count (``folder``: a resume refuses a folder that changed);
    for a poison read from files, its fingerprint (``poison_sha256``: a resume refuses another poison); for .beton
    data, each split's SHA-256 (``beton``: a resume refuses files written again)."""
    s = data.splits
    inputs = {"num_classes": s.num_classes, "shape": list(s.shape), "mean": data.mean.tolist(),
              "std": data.std.tolist(),
              "train_images": len(data.beton if data.beton is not None else data.stream if data.stream is not None
                                  else s.train)}  # data.train_size is a cap: how many it gave
    if data.poison_sha256 is not None:
        inputs["poison_sha256"] = data.poison_sha256
    if (digests := beton_digests(data)) is not None:
        inputs["beton"] = digests
    return {**inputs, "folder": data.folder} if data.folder is not None else inputs


def resolve_auto(cfg: Config, device: torch.device) -> dict:
    """What the ``auto`` settings mean on ``device`` (recorded in meta.json next to the config that says auto):
    deterministic algorithms on the CPU (bit-identical resume), channels-last on a GPU; and the thread count torch
    computes with (``train.threads = 0``: whatever the process has)."""
    t = cfg.train
    meant = auto_meaning({"train.deterministic": t.deterministic, "train.channels_last": t.channels_last,
                          "deepspeed.enabled": cfg.deepspeed.enabled}, device.type)  # one rule with resume's check
    return {"device": str(device), "train.deterministic": meant["train.deterministic"],
            "train.channels_last": meant["train.channels_last"], "train.compile": cfg.train.compile,
            "train.threads": t.threads or torch.get_num_threads()}  # 0: the process's count (setup_seed keeps it)


def setup_seed(cfg: Config, resolved: dict) -> None:
    torch.manual_seed(cfg.train.seed)
    random.seed(cfg.train.seed)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    torch.use_deterministic_algorithms(resolved["train.deterministic"], warn_only=True)
    # cuDNN picks the fastest convolution algorithms for the shapes it sees, unless results must be reproducible
    torch.backends.cudnn.benchmark = resolved["device"].startswith("cuda") and not resolved["train.deterministic"]


COMPILE_OPTIONS: dict = {}
"""Keyword arguments for ``torch.compile`` (the tests use ``backend="aot_eager"``: the same graph capture and
recompiles, without building kernels, which takes minutes on a CPU)."""


def compile_model(model: nn.Module, num_stages: int) -> None:
    """``torch.compile`` the model in place (its submodules, and the frozen-prefix hooks on them, stay the ones the
    trainer holds). Each stage can change the graph (which prefix runs without gradients, which BatchNorms are in
    eval mode), and evaluation is another: the recompile limit is raised to cover them all."""
    import torch._dynamo  # only a compiled run needs dynamo's configuration

    limit = max(16, 4 * num_stages + 8)
    for key in ("recompile_limit", "cache_size_limit"):  # the name changed between torch versions
        if hasattr(torch._dynamo.config, key):
            setattr(torch._dynamo.config, key, max(getattr(torch._dynamo.config, key), limit))
    model.compile(**COMPILE_OPTIONS)


def compiled_graphs() -> int:
    """Graphs dynamo compiled in this process so far (0 when nothing was compiled)."""
    dynamo = sys.modules.get("torch._dynamo.utils")
    return int(dynamo.counters["stats"]["unique_graphs"]) if dynamo is not None else 0


def reinit_head(gm: GroupedModel, seed: int) -> None:
    """Re-initialise every module of the head group, deterministically from ``seed``."""
    head = gm.groups[-1].index
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for u in gm.units:
            if u.group == head:
                for m in u.module.modules():
                    if hasattr(m, "reset_parameters"):
                        m.reset_parameters()


def train_step(gm: GroupedModel, engine: TorchEngine | DeepSpeedEngine | torch.optim.Optimizer, stage: ActiveStage,
               x: torch.Tensor, y: torch.Tensor, lr: float, normalize: Normalize, num_classes: int, autocast,
               world_size: int = 1, defense=None, at: tuple[int, ...] | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """One optimizer step under ``stage``: frozen prefix under no_grad, frozen groups get no grad, lr or wd.
    ``engine`` is a TorchEngine / DeepSpeedEngine, or a bare torch optimizer (wrapped in a TorchEngine).
    ``defense`` (a DefenseConfig) with kind 'adv' trains on PGD adversarial examples of the batch; with kind
    'ueraser' on UEraser's loss over random views of it, drawn from ``at`` = (run seed, epoch, step, rank); a stage
    with ``loss.mix`` trains on the batch mixed (:func:`pst_dist.pst.losses.mix_batch`), its draws from ``at`` too.
    Nothing here waits for the device: loss, logits and the loss parts come back as device tensors."""
    if isinstance(engine, torch.optim.Optimizer):
        engine = TorchEngine(gm.model, engine, world_size)
    with torch.no_grad():
        broadcast_buffers(gm.model)  # one BatchNorm state on every rank (no-op on one process)
    xf = x.float() / 255 if x.dtype == torch.uint8 else x.float()
    if defense is not None and defense.kind == "adv":
        gm.set_frozen_prefix((1.0,) * gm.num_groups)  # the attack needs the gradient down to the input
        xf = pgd_examples(gm.model, xf, y, normalize, defense.adv_eps, defense.adv_step, defense.adv_steps)
    gm.set_frozen_prefix(stage.mults)  # idempotent; re-installs hooks after a resume
    set_group_lrs(engine.optimizer, lr, stage.mults)
    if defense is not None and defense.kind == "ueraser":
        if at is None:  # a fixed default would give every step the same views
            raise ValueError("train_step: defense.kind='ueraser' draws its views from at=(seed, epoch, step, rank)")
        loss, logits, parts = ueraser_loss(gm, xf, y, stage.loss, normalize, num_classes, autocast,
                                           ueraser_repeats(defense, at[1]), step_seed(*at))
    elif stage.loss.mix != "none":  # the cross-entropy terms on the mixed labels; metrics on the images' own
        if at is None:
            raise ValueError("train_step: loss.mix draws its weights from at=(seed, epoch, step, rank)")
        xf, target = mix_batch(xf, y, stage.loss.mix, stage.loss.mix_alpha, num_classes, step_seed(*at))
        loss, logits, parts = stage_loss(gm, xf, target, stage.loss, normalize, num_classes, autocast)
    else:
        loss, logits, parts = stage_loss(gm, xf, y, stage.loss, normalize, num_classes, autocast)
    engine.backward(loss, stage.mults)
    engine.step(stage.mults)
    return loss.detach(), logits.detach(), parts


class TrainingDiverged(RuntimeError):
    """The loss or the weights became NaN / inf; the run stopped, its last good checkpoint kept."""


def _on_every_rank(fn):
    """``fn()`` on the primary rank; its result, or its error, reaches every rank (so all raise together instead of
    the others waiting forever in the next collective)."""

    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return fn()
    box = [None]
    if dist.get_rank() == 0:
        try:
            box[0] = ("ok", fn())
        except ConfigError as e:
            box[0] = ("error", str(e))
    dist.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == "error":
        raise RunDirError(value)
    return value


def all_finite(model: nn.Module) -> bool:
    """Whether every parameter is finite, on every rank (a rank's ZeRO-3 partition included). The checks stay on
    each parameter's device and are read back once per device, not once per parameter tensor."""
    flags: dict[torch.device, list[torch.Tensor]] = {}
    for p in model.parameters():
        if p.numel():
            flags.setdefault(p.device, []).append(torch.isfinite(p.detach()).all())
    local = all(bool(torch.stack(fs).all()) for fs in flags.values())
    return mean_across_ranks(float(local)) == 1.0


@dataclass
class TrainState:
    """What a checkpoint carries besides weights and optimizer: the schedule is recomputed from it on resume."""

    step: int = 0
    epoch: int = 0
    history: list[list[int]] = field(default_factory=list)
    """Trigger firings [stage index, step], sorted: with ``step`` all :meth:`Schedule.stage_at` needs."""
    entered: int = -1
    """The stage whose freezing / head re-init was last applied."""
    records: list[dict] = field(default_factory=list)
    """Per-epoch numeric logs (losses, accuracies): the summary is computed from them."""
    saved_epoch: int = 0
    """The epoch of the last checkpoint written (not saved itself: a resumed run starts at its own)."""

    def to_dict(self) -> dict:
        return {"step": self.step, "epoch": self.epoch, "history": self.history, "entered": self.entered,
                "records": self.records}

    @classmethod
    def from_dict(cls, d: dict, where: Path | str = "checkpoint") -> TrainState:
        """The state :meth:`to_dict` saved, or a CheckpointError naming ``where`` (the run directory)."""
        try:
            st = cls(step=d["step"], epoch=d["epoch"], history=[list(h) for h in d["history"]],
                     entered=d["entered"], records=list(d["records"]), saved_epoch=d["epoch"])
        except (KeyError, TypeError) as e:
            raise CheckpointError(f"{where}: the checkpoint's trainer state is not pst-dist's "
                                  f"({type(e).__name__}: {e})") from None
        if not all(isinstance(getattr(st, k), int) and not isinstance(getattr(st, k), bool) and getattr(st, k) >= 0
                   for k in ("step", "epoch")):
            raise CheckpointError(f"{where}: the checkpoint's trainer state has step {st.step!r}, epoch {st.epoch!r}: "
                                  f"expected integers >= 0")
        return st


@dataclass
class Run:
    """Everything one training run is built from (see :func:`build_run`)."""

    cfg: Config
    dist: DistInfo
    device: torch.device
    data: Data
    loader: object
    gm: GroupedModel
    schedule: Schedule
    engine: TorchEngine | DeepSpeedEngine
    normalize: Normalize
    autocast: object
    probe: tuple[torch.Tensor, torch.Tensor]
    metrics: Metrics
    state: TrainState
    perf: list[dict] = field(default_factory=list)
    """Per-epoch throughput of this process's epochs (not checkpointed: timings are not results)."""

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.log.run_dir)


def refuse_unless_in_memory(data: Data, what: str) -> None:
    """ConfigError (``what``, then why) when the training split is not in memory: streamed or in a .beton."""
    if data.stream is not None or data.beton is not None:
        where = ("streamed from its folder (data.stream=false reads it into memory)" if data.stream is not None
                 else "read from a .beton (train from the data set's own source instead)")
        raise ConfigError(f"{what}, but this run's training split is {where}")


def _check_values(data: Data, key: str, then: dict | None, values) -> tuple[float, float]:
    """(shift, noise) of a data check before training: the values the run started with (``then``, meta.json's
    inputs record of it) on a resume, so that it decides as the run did (another machine's float rounding could move
    a value near the threshold); otherwise ``values(training images, labels, validation images, labels)``, refused
    (ConfigError naming ``key``, the check's setting) when the training split is not in memory or the validation
    split has too few classes."""
    if then is not None:
        return then["shift"], then["noise"]
    refuse_unless_in_memory(data, f"{key}: the check reads every training image")
    val = data.splits.val
    try:
        return values(data.poisoned_train, data.splits.train.labels, val.images, val.labels)
    except ValueError as e:
        raise ConfigError(f"{key}: {e} (the validation split has {len(val)} image{'s' * (len(val) != 1)}; "
                          f"data.val_size sets it)") from None


def spectral_check(cfg: Config, data: Data, recorded: dict | None = None) -> tuple[dict[str, float], frozenset[int]]:
    """The data check of the stages (all but the last, which never stays) whose ``trigger.spectral_check`` is set:
    ({"detect/spectral_shift": the training set's class-wise spectral shift against the validation split,
    "detect/spectral_noise": its sampling noise}, or {} when no stage asks; the stages whose threshold times the noise
    the shift exceeds, which then do not stay). A resume takes the values the run started with (meta.json's inputs,
    ``recorded``) rather than computing them again, so that its stages stay those it trained (another machine's
    float rounding could move a value near the threshold). Run on the primary rank only (``_on_every_rank``)."""
    checks = cfg.schedule.spectral_checks()
    if not checks:
        return {}, frozenset()
    then = (recorded or {}).get("spectral_check")
    key = f"schedule.stages[{min(checks)}].trigger.spectral_check={checks[min(checks)]}"
    shift, noise = _check_values(data, key, then, spectral_values)
    no_stay = frozenset(i for i, t in checks.items() if over_noise(shift, noise, t))
    verdict = (f"a class-wise filter: stages {sorted(no_stay)} do not stay (unfired, they end at their planned "
               f"length)" if no_stay else "no class-wise filter: unfired stages stay")
    times = shift / noise if noise else math.inf
    print(f"[pst] spectral check{' (recorded at the run start)' * (then is not None)}, training vs validation "
          f"images: shift {shift:.3f}, {times:.1f} times its sampling noise {noise:.3f} (threshold "
          f"{', '.join(f'{t:g}' for t in checks.values())}): {verdict}", flush=True)
    return {"detect/spectral_shift": shift, "detect/spectral_noise": noise}, no_stay


def _repaired(data: Data, what: str, record: str, says: str, repair, recorded: dict | None,
              is_primary: bool) -> tuple[Data, dict]:
    """(``data`` with its training images replaced by ``repair(images, labels, validation images, validation
    labels)``, what meta.json's inputs record of it under ``record``: the fraction of pixels changed and the repaired
    set's fingerprint), for the setting ``what``, printing ``says``. Each rank computes it from the same images; a
    resume whose repaired images differ from those the run started with (``recorded``: another machine's rounding)
    says so on stderr, as for other kernels, and trains on."""
    refuse_unless_in_memory(data, f"{what}: the repair rewrites every training image")
    val, labels = data.splits.val, data.splits.train.labels
    repaired = repair(data.poisoned_train, labels, val.images, val.labels)
    changed = int(torch.count_nonzero(repaired != data.poisoned_train)) / repaired.numel()
    info = {"changed": changed, "sha256": fingerprint(Split(repaired, labels))}
    then = (recorded or {}).get(record) or {}
    if is_primary:
        print(f"[pst] {says} ({changed:.1%} of the training pixels changed)", flush=True)
        if "sha256" in then and then["sha256"] != info["sha256"]:
            print(f"[resume] the training images repaired by {what} differ from those the run started with (sha256 "
                  f"{info['sha256'][:12]} now, {then['sha256'][:12]} then: this machine rounds the repair "
                  f"otherwise); training on", file=sys.stderr)
    return dataclasses.replace(data, poisoned_train=repaired), info


def spectral_repair(data: Data, recorded: dict | None = None, is_primary: bool = True) -> tuple[Data, dict]:
    """(``data`` whose training images have each class's mean power spectrum made the validation split's, what
    meta.json's inputs record of it) for ``trigger.spectral_repair`` (:func:`_repaired`)."""
    return _repaired(data, "trigger.spectral_repair", "spectral_repair", "spectral repair: each class's training "
                     "spectrum made the validation split's", equalize_spectra, recorded, is_primary)


def mean_check(cfg: Config, data: Data, recorded: dict | None = None) -> tuple[dict[str, float], bool]:
    """``schedule.mean_repair``'s check of the training images: ({"detect/mean_shift": the class-wise significant
    mean shift against the validation split, "detect/mean_noise": its sampling noise}, or {} when the recipe has no
    check; whether the shift exceeds ``mean_repair`` times the noise)
    (:func:`pst_dist.pst.detectors.mean_shift_values`). A resume takes the values the run started with (meta.json's
    inputs, ``recorded``), as :func:`spectral_check` does. Run on the primary rank only (``_on_every_rank``)."""
    threshold = cfg.schedule.mean_repair
    if not threshold:
        return {}, False
    then = (recorded or {}).get("mean_repair")
    shift, noise = _check_values(data, f"schedule.mean_repair={threshold}", then, mean_shift_values)
    fired = over_noise(shift, noise, threshold)  # a computed noise is floored above 0 (mean_shift_values)
    verdict = ("a class-wise additive shortcut: its significant shifts are subtracted" if fired
               else "no class-wise additive shortcut: the images stay as they are")
    times = shift / noise if noise else math.inf  # a recorded noise of 0 (hand-edited) still prints
    print(f"[pst] mean check{' (recorded at the run start)' * (then is not None)}, training vs validation images: "
          f"shift {shift:.3f} levels, {times:.1f} times its sampling noise {noise:.3f} (threshold {threshold:g}): "
          f"{verdict}", flush=True)
    return {"detect/mean_shift": shift, "detect/mean_noise": noise}, fired


def mean_repair(data: Data, recorded: dict | None = None, is_primary: bool = True) -> tuple[Data, dict]:
    """(``data`` whose training images have each class's significant mean shift against the validation split
    subtracted, what meta.json's inputs record of it) for ``schedule.mean_repair`` once its check has fired
    (:func:`_repaired`)."""
    return _repaired(data, "schedule.mean_repair", "mean_repair", "mean repair: each class's significant shift "
                     "against the validation split subtracted", subtract_mean_shift, recorded, is_primary)


def build_run(cfg: Config, resume: bool | str, overwrite: bool, allow_changes: bool, data: Data | None,
              loader) -> Run:
    """Validate the run directory, build data, loader, model, groups, schedule and engine, restore a checkpoint,
    and write the run's header: nothing is written before every input has been checked."""
    device = build_device(cfg)
    dist_info: DistInfo = init_distributed(device.type, single_process_group=cfg.deepspeed.enabled)

    def decide() -> tuple[dict[str, tuple], bool, bool]:
        run_dir = Path(cfg.log.run_dir)
        if resume == "auto" and overwrite:
            raise RunDirError("--resume=auto and --overwrite together: continue the run or replace it, not both")
        wanted = bool(holds_run(run_dir)) if resume == "auto" else resume  # rank 0's view of the run directory
        changes = check_run_dir(cfg, wanted, overwrite, allow_changes)
        if wanted and not engine_class(cfg).has_checkpoint(run_dir) and resume_from_scratch(run_dir):
            check_run_dir(cfg, False, True)  # what --overwrite checks before it removes the run's own files
            return {}, True, wanted
        return changes, False, wanted

    def check_inputs() -> tuple[dict[str, tuple], bool, bool]:  # before any work
        check_trackers(cfg.log.trackers)  # a tracker's package missing is refused before the run writes anything
        if not Path(cfg.log.run_dir).is_dir():  # nothing there to read: refused before the lock makes the folder
            decide()
        lock_run_dir(Path(cfg.log.run_dir))  # released by train(), whatever happens after
        return decide()  # what the run directory holds, read once no other process trains into it

    auto = resume == "auto"
    changes, again, resume = _on_every_rank(check_inputs)
    if again:  # the config matched the run's record: a preemption wrapper's --resume works from the first epoch on
        resume, overwrite = False, True
        if dist_info.is_primary:
            print(f"[resume] {cfg.log.run_dir}: stopped before its first checkpoint, so nothing to resume from; "
                  f"starting it again from epoch 0 (its own files replaced, as --overwrite does)", file=sys.stderr)
    elif auto and not resume and dist_info.is_primary:
        print(f"[resume] --resume=auto: {cfg.log.run_dir} holds no run; starting it", file=sys.stderr)
    resolved = resolve_auto(cfg, device)
    setup_seed(cfg, resolved)
    recorded = resumed_inputs(Path(cfg.log.run_dir)) if resume else None
    if data is None:
        data = build_data(cfg, recorded=recorded, keep_clean=False)  # checks the folder before decoding anything
    else:  # built by the caller (tune's trials, the bench's cells), already decoded
        check_same_folder(recorded, data.folder, cfg.data)
    if resume:
        if dist_info.is_primary:  # the moves check_run_dir accepted (rundir.relocations): the checks below decide
            checked = {"data.root": data.beton is not None, "poison.path": data.poison_sha256 is not None}
            for key in (k for k in RELOCATABLE if k in changes and checked[k]):
                print(f"[resume] {key} moved: {changes[key][0]!r} -> {changes[key][1]!r}; the run goes on only if "
                      f"the data there is what it started on (checked before it writes anything: "
                      f"{RELOCATABLE[key]})", file=sys.stderr)
        check_same_poison(recorded, data, cfg)
        check_same_beton(recorded, data, cfg, moved="data.root" in changes)
        data = started_normalisation(recorded, data, dist_info.is_primary)
    resolved["data.stream"] = data.stream is not None
    # computed on rank 0, its values or its refusal on every rank: the ranks switch stages together
    spectral, no_stay = _on_every_rank(lambda: spectral_check(cfg, data, recorded))
    repair = None  # what meta.json records of the repair, when there is one
    if any(cfg.schedule.stages[i].trigger.spectral_repair for i in no_stay):
        if loader is not None:
            raise ConfigError("trigger.spectral_repair: the check found a class-wise filter, but the caller built "
                              "the loader; let train() build it from the repaired images")
        data, repair = spectral_repair(data, recorded, dist_info.is_primary)
    # the spectral repair takes the place of the mean repair: a filter's repair leaves a class-mean residue that the
    # mean repair would take for a shortcut (with both, Fashion-MNIST conv-blur lost 1.1 points: section 42)
    mean, fired = {}, False
    if cfg.schedule.mean_repair and repair is None:
        mean, fired = _on_every_rank(lambda: mean_check(cfg, data, recorded))
    elif cfg.schedule.mean_repair:
        if (recorded or {}).get("mean_repair") is not None:
            raise ConfigError(f"{cfg.log.run_dir}: the run started with schedule.mean_repair applied after the "
                              f"spectral repair (an earlier pst-dist, meta.json's git_sha); this version skips it "
                              f"there, so the resume would train on other images; start the run again (--overwrite)")
        if dist_info.is_primary:
            print("[pst] mean check skipped: the spectral repair rewrote the training images (a class-wise filter, "
                  "not an additive shortcut; schedule.mean_repair)", flush=True)
    mean_record: dict = {}  # what meta.json records of the check, and of the repair when it fired
    if mean:
        mean_record = {"shift": mean["detect/mean_shift"], "noise": mean["detect/mean_noise"]}
        if fired:
            if loader is not None:
                raise ConfigError("schedule.mean_repair: the check found a class-wise additive shortcut, but the "
                                  "caller built the loader; let train() build it from the repaired images")
            data, info = mean_repair(data, recorded, dist_info.is_primary)
            mean_record.update(info)
    s = data.splits
    run_dir = Path(cfg.log.run_dir)
    loader = loader or build_loader(cfg, data, dist_info, device)
    channels_last = resolved["train.channels_last"]
    model = build_model(cfg.model, s.num_classes, s.shape[0], s.shape[1]).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    gm = trace_units(model, layer_groups(model, cfg.model.block_groups), data.poisoned_train[:2].to(device).float())
    accum = cfg.deepspeed.grad_accum if cfg.deepspeed.enabled else 1
    if len(loader) % accum:  # the epoch's checkpoint would fall inside a window whose gradients DeepSpeed never saves
        raise ConfigError(f"deepspeed.grad_accum={accum} does not divide the {len(loader)} batches of an epoch (per "
                          f"rank): an epoch's checkpoint would fall inside an accumulation window, and a resume would "
                          f"not continue the run; choose a divisor of {len(loader)}")
    total_steps = len(loader) * cfg.train.epochs
    checks = cfg.schedule.check_every or len(loader)  # the steps after which detect() consults a trigger
    schedule = Schedule(cfg.schedule.stages, gm.num_groups, len(loader), total_steps,  # validates group indices
                        no_stay, checks)
    check_views(cfg, data.poisoned_train[:2].float() / 255)
    if not cfg.deepspeed.enabled and dist_info.is_primary:  # [deepspeed] settings are recorded as given, and inert
        default = asdict(DeepSpeedConfig())
        if unused := {k: v for k, v in asdict(cfg.deepspeed).items() if v != default[k]}:
            print(f"[deepspeed] deepspeed.enabled=false: {', '.join(f'deepspeed.{k}={v}' for k, v in unused.items())} "
                  f"do nothing in this run (the plain torch engine has no ZeRO, accumulation or clipping)",
                  file=sys.stderr)
    unconsulted = schedule.unconsulted_triggers()
    for i in unconsulted if dist_info.is_primary else []:
        st_cfg = cfg.schedule.stages[i]
        where = ("before its planned end, or past it while the stages after it still get their planned lengths"
                 if schedule.stays(i) else "before its planned end, where it ends")
        cadence = f"every {checks} steps" if cfg.schedule.check_every else f"at each epoch's end, every {checks} steps"
        if schedule.planned_end(i) >= total_steps:  # a longer stage would not help: the run ends inside it
            fix = (f"as planned the stage lasts until the run's end (step {total_steps}), where a fire lets nothing "
                   f"follow; lengthen the run (train.epochs){', lower min_epochs' if st_cfg.min_epochs else ''}")
        else:
            fix = "lower min_epochs, lengthen the stage"
        print(f"[pst] stage {i} ({st_cfg.name!r}): its trigger is never consulted (the checks run {cadence}; it "
              f"may fire at one after the stage's first step and min_epochs={st_cfg.min_epochs}, {where}); {fix} "
              f"or check more often (schedule.check_every) to let it fire", file=sys.stderr)
    for i, st_cfg in enumerate(cfg.schedule.stages) if dist_info.is_primary else []:
        if not schedule.stays(i) or i in unconsulted:
            continue
        window, need = schedule.stay_window(i), total_steps - schedule.fire_deadline(i)
        planned = " (steps as planned: an earlier stage's fire moves them)" if i else ""
        if window:
            fit = f"so that the stages after it get their planned {need} steps, " if need else ""
            print(f"[pst] stage {i} ({st_cfg.name!r}): unfired at its planned end it stays; past that its trigger "
                  f"may fire until step {window[1]} (its last check) of {total_steps} "
                  f"(epoch {window[1] / len(loader):.2f}), {fit}then it stays to the end{planned}", file=sys.stderr)
        else:
            print(f"[pst] stage {i} ({st_cfg.name!r}): unfired at its planned end it stays to the end without "
                  f"consulting its trigger again: no check (every {checks} steps) falls past its planned end, after "
                  f"min_epochs={st_cfg.min_epochs} and up to step {schedule.fire_deadline(i)}, its fire deadline "
                  f"(the stages after it need {need} of the run's {total_steps} steps){planned}", file=sys.stderr)
    last = len(cfg.schedule.stages) - 1
    if dist_info.is_primary and cfg.schedule.stages[last].trigger is not None:
        print(f"[pst] stage {last} ({cfg.schedule.stages[last].name!r}), the last, runs to the run's end: its trigger "
              f"is never consulted (a fire would start no stage; its view is still measured and logged); add a stage "
              f"after it for the trigger to end",
              file=sys.stderr)
    for i in schedule.unreached_stages() if dist_info.is_primary else []:
        fired = (" unless an earlier stage's trigger fires early enough" if any(
            st.trigger is not None for st in cfg.schedule.stages[:i]) else "")
        print(f"[pst] stage {i} ({cfg.schedule.stages[i].name!r}) starts as planned at step "
              f"{schedule.planned_end(i - 1)}, at or past the run's end (step {total_steps}, train.epochs="
              f"{cfg.train.epochs}): it does not run{fired}; lengthen the run or shorten the stages before it",
              file=sys.stderr)
    engine = build_engine(cfg, model, build_optimizer(cfg, model, gm), dist_info)
    if cfg.train.compile:
        compile_model(model, len(cfg.schedule.stages))
    normalize = Normalize(data.mean, data.std, device, channels_last=channels_last)
    probe_n = min(cfg.data.probe_size, len(s.train))
    probe = (data.poisoned_train[:probe_n].to(device).float() / 255, s.train.labels[:probe_n].to(device))
    autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.train.bf16)
    ds = cfg.deepspeed
    if ds.enabled and (ds.bf16 or ds.fp16):  # DeepSpeed holds the weights in that dtype: feed it, no autocast
        normalize = Normalize(data.mean, data.std, device, torch.bfloat16 if ds.bf16 else torch.float16,
                              channels_last)
        autocast = contextlib.nullcontext
    st = TrainState()
    if resume:
        st = TrainState.from_dict(engine.load(run_dir, cfg.model.name), run_dir)
        if st.epoch > cfg.train.epochs:
            raise RunDirError(f"--resume: train.epochs={cfg.train.epochs} but {run_dir} already trained "
                              f"{st.epoch} epochs")
        stayed = schedule.past_deadline(st.step, tuple(tuple(h) for h in st.history))
        if stayed is not None and dist_info.is_primary:
            print(f"[pst] resuming at step {st.step}: stage {stayed} ({cfg.schedule.stages[stayed].name!r}) has "
                  f"no check left where its trigger may fire (after min_epochs="
                  f"{cfg.schedule.stages[stayed].min_epochs}, up to step {schedule.fire_deadline(stayed)}, its fire "
                  f"deadline), so it stays to the end without consulting it again (a run begun before the deadline "
                  f"existed could have fired later; meta.json's git_sha says which code began it)", file=sys.stderr)
    if dist_info.is_primary:  # only now that every input has been validated
        if resume or overwrite:  # a checkpoint-sized temporary of a segment killed while saving (GBs each)
            remove_stale(run_dir, RUN_FILES, "tmp")
        if overwrite:
            remove_run_files(run_dir)
        inputs = model_inputs(data)
        if spectral:  # a resume takes the check's values from here (spectral_check)
            inputs["spectral_check"] = {"shift": spectral["detect/spectral_shift"],
                                        "noise": spectral["detect/spectral_noise"]}
        if repair is not None:  # ... and compares its repaired images with these (spectral_repair)
            inputs["spectral_repair"] = repair
        if mean:  # the same for schedule.mean_repair (mean_check, mean_repair)
            inputs["mean_repair"] = mean_record
        if not resume:  # a fresh run's config.toml first: it says whose the files written after it are
            write_run_header(run_dir, cfg, None, changes, resolved, inputs, device)
    metrics = Metrics(run_dir, dist_info.is_primary, cfg.log.tensorboard, cfg, st.step if resume else None)
    try:
        if resume and dist_info.is_primary:  # once the trackers are open: a resume they refuse leaves the run's
            write_run_header(run_dir, cfg, st.epoch, changes, resolved, inputs, device)  # record as it was
            said = "; ".join(f"{k}: {was!r} -> {now!r}" for k, (was, now) in changes.items())
            print(f"[resume] {run_dir} from epoch {st.epoch}, to train.epochs={cfg.train.epochs:g}; "
                  + (f"changed since its record (meta.json keeps it): {said}" if said else "as recorded"),
                  file=sys.stderr)
        if not resume:  # a resume's run logged these at its start
            metrics.image("data/poisoned_samples", make_grid(data.poisoned_train[:64], nrow=8))
            if spectral:
                repaired = {} if repair is None else {"pst/spectral_repair_changed": repair["changed"]}
                metrics.log(0, {**spectral, "pst/spectral_check_fired": float(bool(no_stay)), **repaired})
            if mean:
                metrics.log(0, {**mean, "pst/mean_repair_fired": float("changed" in mean_record),
                                "pst/mean_repair_changed": mean_record.get("changed", 0.0)})
    except BaseException:  # train() closes a Run's metrics; there is no Run yet
        metrics.close(failed=True)
        raise
    return Run(cfg, dist_info, device, data, loader, gm, schedule, engine, normalize, autocast, probe, metrics, st)


def check_views(cfg: Config, sample: torch.Tensor) -> None:
    """Apply every view the run will apply (the stages' loss views, their triggers' views, schedule.eval_views) once
    to ``sample``: one the images cannot take (a blur kernel wider than the image) is a ConfigError naming its key,
    before anything is written, not a traceback mid-training. Torch's random state is left as it was."""
    uses = []
    for i, st in enumerate(cfg.schedule.stages):
        if st.loss.view_ce > 0 or st.loss.consistency > 0:
            uses.append((f"schedule.stages[{i}].loss.view", st.loss.view, st.loss.view_strength))
        view, more = detector_views(st.trigger)  # measured on the probe each epoch (detect)
        uses.append((f"schedule.stages[{i}].trigger.view" if st.trigger else
                     f"schedule.stages[{i}] (no trigger): the detectors' default view", view, 1.0))
        uses += [(f"schedule.stages[{i}].trigger.also[{name.removeprefix('also_')}].view", v, 1.0)
                 for name, v in more.items()]
    uses += [(f"schedule.eval_views[{j}]", v, 1.0) for j, v in enumerate(cfg.schedule.eval_views)]
    with torch.random.fork_rng(devices=[]):  # random views draw from the global generator: training's is untouched
        for key, view, strength in uses:
            try:
                apply_view(sample, view, strength)
            except (RuntimeError, ValueError) as e:
                raise ConfigError(f"{key}={view!r} (strength {strength:g}) cannot be applied to these "
                                  f"{'x'.join(map(str, sample.shape[1:]))} images (C x H x W): "
                                  f"{str(e).splitlines()[0]}") from None


def detector_views(trig: TriggerConfig | None) -> tuple[str, dict[str, str]]:
    """The view the detectors measure the probe on (the trigger's; blur for a stage without one), and the views of
    the trigger's ``also`` shortcut gaps by condition name (``also_<i>``)."""
    if trig is None:
        return "blur", {}
    return trig.view, {f"also_{i}": c.view for i, c in enumerate(trig.also) if c.kind == "shortcut_gap"}


def detect(r: Run, stage: ActiveStage) -> dict[str, float]:
    """Run the detectors on the probe; fire the stage's trigger (recorded in ``r.state.history``) when its value,
    averaged over ranks so that every rank switches together, crosses the threshold."""
    st, trig = r.state, stage.config.trigger
    # the trigger's own condition first, then its also[]: any fires it; an also gap is measured on its view as also_<i>
    conditions = [(trig, None), *((c, f"also_{i}" if c.kind == "shortcut_gap" else None)
                                  for i, c in enumerate(trig.also))] if trig else []
    view, more = detector_views(trig)
    vals = probe_metrics(r.gm, *r.probe, r.normalize, view, more_views=more)
    if trig is not None and r.schedule.can_fire(stage, st.step):
        values = [mean_across_ranks(trigger_value(c.kind, vals, c.group, name)) for c, name in conditions]
        vals["pst/trigger_value"] = values[0]
        vals.update({f"pst/trigger_value/also_{i}": v for i, v in enumerate(values[1:])})
        crossed = [i for i, ((c, _), v) in enumerate(zip(conditions, values, strict=True)) if v > c.threshold]
        if crossed:
            st.history = sorted([*st.history, [stage.index, st.step]])
            vals["pst/trigger_fired"] = float(stage.index)
            vals["pst/trigger_fired_by"] = float(crossed[0])  # 0: the trigger's own condition, i: also[i - 1]
    return {k if k.startswith("pst/") else f"detect/{k}": v for k, v in vals.items()}


def set_train_mode(r: Run, stage: ActiveStage) -> None:
    r.gm.model.train()
    if r.cfg.schedule.freeze_bn_stats:  # frozen groups' BatchNorm keeps its running statistics
        r.gm.fix_frozen_bn(stage.mults)


def enter_stage(r: Run, stage: ActiveStage) -> None:
    """Freeze / unfreeze / rescale for a new stage, re-initialising the head where the stage asks."""
    if stage.config.reinit_head and stage.index > r.state.entered:
        with r.engine.gathered():
            reinit_head(r.gm, r.cfg.train.seed * 1000 + stage.index)
        r.engine.module_changed()
    set_train_mode(r, stage)
    r.state.entered = stage.index
    r.metrics.log(r.state.step, {"pst/stage": stage.index})


def stop_if_diverged(r: Run, loss_sum: float, epoch: int, lr: float, weights: bool = False) -> None:
    """A non-finite loss sum (or, with ``weights``, a non-finite weight) on any rank stops every rank: the failure
    is recorded (summary.json, status failed), the last checkpoint stays, and TrainingDiverged is raised."""
    if math.isfinite(mean_across_ranks(loss_sum)):
        if not weights or all_finite(r.gm.model):
            return
        what = "non-finite weights after an optimizer step"
    else:
        what = f"non-finite training loss ({loss_sum})"
    st = r.state
    kept = f"its last good checkpoint (epoch {st.saved_epoch}) is kept" if st.saved_epoch else \
        "no checkpoint was written"
    msg = (f"{what} at epoch {epoch + 1}, step {st.step} (train.lr={r.cfg.train.lr}, lr at that step {lr:.3g}): "
           f"training stopped; {kept} in {r.run_dir}")
    failed = {**summarize(st.to_dict()), "status": "failed", "error": msg, "world_size": r.dist.world_size}
    if r.dist.is_primary:
        with reported("writing the failed run's summary.json"):  # every rank still reaches teardown's barrier
            write_atomic(r.run_dir / "summary.json", json.dumps(failed, indent=2))
    with reported("leaving the process group after the divergence"):
        teardown()  # every rank saw the same mean: all reach its barrier (train() closes the metrics, failed)
    raise TrainingDiverged(msg)


class EpochMeter:
    """One epoch's running sums, kept on the device so that a training step never waits for it (reading them is
    what waits: :meth:`read`, at logging points only), and its clock: the epoch's wall time and the part of it the
    loop spent waiting for its next batch."""

    def __init__(self, device: torch.device, graphs_before: int):
        self.device = device
        self.graphs_before = graphs_before  # the process's compiled graphs before the run: others' (a bench's cells)
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.correct = torch.zeros((), dtype=torch.long, device=device)
        self.seen = self.steps = 0
        self.wait = 0.0
        self.start = time.perf_counter()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

    def batches(self, loader):
        """``loader``'s batches, timing how long each took to arrive."""
        it = iter(loader)
        while True:
            t = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                return
            self.wait += time.perf_counter() - t
            yield batch

    def add(self, loss: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> None:
        self.loss_sum += loss.double() * len(y)
        self.correct += (logits.argmax(1) == y).sum()
        self.seen += len(y)
        self.steps += 1

    def read(self) -> tuple[float, float]:
        """(loss sum, accuracy so far): waits for the device."""
        return float(self.loss_sum), int(self.correct) / max(self.seen, 1)

    def perf(self) -> dict[str, float]:
        """Throughput of the epoch so far (call after :meth:`read`, which waited for the device)."""
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device) / 2**30
        else:  # the process's peak resident memory (ru_maxrss is in KiB on Linux)
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        return {"perf/img_per_s": self.seen / elapsed, "perf/step_ms": 1000 * elapsed / max(self.steps, 1),
                "perf/data_wait": self.wait / elapsed, "perf/peak_mem_gb": peak,
                "perf/compiles": compiled_graphs() - self.graphs_before}


def train(cfg: Config, resume: bool | str = False, data: Data | None = None, loader=None,
          stop_after_epochs: int | None = None, on_epoch=None, overwrite: bool = False,
          allow_changes: bool = False) -> dict:
    """Train one configuration; returns the summary (final/peak accuracies). Writes everything to cfg.log.run_dir.

    A run directory that already holds a run needs ``resume`` (same config, but for what
    :data:`pst_dist.config.RESUME_MAY_CHANGE` lists; ``allow_changes`` lifts that, e.g. for a PBT trial that adopts
    another trial's checkpoint) or ``overwrite`` (its run files are removed, nothing else). ``resume="auto"``:
    resume when the run directory holds a run, else start one (a job wrapper's one command for every launch).
    ``stop_after_epochs`` ends the run early as an interruption would (after that epoch's checkpoint).
    ``on_epoch(epoch, logs, gm, engine)`` is called on every rank after each epoch's checkpoint (a reporting hook
    for Ray Tune and for tests; under ZeRO-3 use ``engine.gathered()`` to see full parameters).
    A NaN / inf loss or weight raises :class:`TrainingDiverged` after writing a summary with ``status = "failed"``;
    the last good checkpoint stays.
    A bench or a search trains many runs in one process: a run that fails closes its trackers' runs (marked failed)
    and TensorBoard's writer and leaves the one-process group it made; torch's thread count is put back after a run.
    """
    r, threads, graphs = None, torch.get_num_threads(), compiled_graphs()
    try:
        r = build_run(cfg, resume, overwrite, allow_changes, data, loader)
        return run_epochs(r, stop_after_epochs, on_epoch, graphs)
    except BaseException:
        if r is not None:
            r.metrics.close(failed=True)  # reports, never raises, what it cannot close
        with reported("leaving the process group after the run's error"):
            teardown(failed=True)
        raise
    finally:
        unlock_run_dir(Path(cfg.log.run_dir))  # rank 0's (build_run), after the summary and the trackers' close
        torch.set_num_threads(threads)


def run_epochs(r: Run, stop_after_epochs: int | None, on_epoch, graphs_before: int) -> dict:
    """The epochs of :func:`train`: schedule -> freeze -> forward / backward -> step -> log, then the epoch's
    evaluation and checkpoint; returns :func:`finish_run`'s summary. ``graphs_before``: the graphs dynamo had
    compiled in this process before the run (perf/compiles counts the run's own)."""
    cfg = r.cfg
    st, s, schedule, model = r.state, r.data.splits, r.schedule, r.gm.model
    last_detect: dict[str, float] = {}
    run_steps = schedule.total_steps if cfg.train.lr_span == "run" else None  # the lr shape's span: the run's steps
    for epoch in range(st.epoch, cfg.train.epochs):
        if hasattr(r.loader, "set_epoch"):
            r.loader.set_epoch(epoch)
        stage = schedule.stage_at(st.step, st.history)  # the stage of the epoch's last step (logged at its end)
        lr = cfg.train.lr * lr_factor(stage, st.step, cfg.train.lr_schedule, cfg.train.warmup_steps, run_steps)
        set_train_mode(r, stage)
        meter = EpochMeter(r.device, graphs_before)
        bar = tqdm(meter.batches(r.loader), total=len(r.loader), desc=f"epoch {epoch + 1}/{cfg.train.epochs}",
                   leave=False, disable=not (cfg.log.progress and r.dist.is_primary))
        for x, y in bar:  # ---- schedule -> freeze -> forward / backward -> step -> log ----
            # nothing in a step waits for the device; only logging points (every 50 steps) read values back
            stage = schedule.stage_at(st.step, st.history)
            if stage.index != st.entered:
                enter_stage(r, stage)
            elif stage.stayed and st.step == stage.start:  # past its planned length unfired (trigger.otherwise)
                r.metrics.log(st.step, {"pst/stayed": stage.index})
            lr = cfg.train.lr * lr_factor(stage, st.step, cfg.train.lr_schedule, cfg.train.warmup_steps, run_steps)
            x, y = x.to(r.device, non_blocking=True), y.to(r.device, non_blocking=True)  # no-op: loaders place it
            loss, logits, parts = train_step(r.gm, r.engine, stage, x, y, lr, r.normalize, s.num_classes,
                                             r.autocast, r.dist.world_size, cfg.defense,
                                             (cfg.train.seed, epoch, st.step, r.dist.rank))
            st.step += 1
            meter.add(loss, logits, y)
            if st.step % 50 == 0:
                loss_sum, acc = meter.read()
                stop_if_diverged(r, loss_sum, epoch, lr)  # every rank checks at the same steps
                bar.set_postfix(loss=f"{loss_sum / meter.seen:.3f}", acc=f"{acc:.3f}", stage=stage.index)
                r.metrics.log(st.step, {"train/loss_step": float(loss), "train/lr": lr,
                                        **{k: float(v) for k, v in parts.items()}, **meter.perf()})
            if cfg.schedule.check_every and st.step % cfg.schedule.check_every == 0:
                last_detect = detect(r, schedule.stage_at(st.step, st.history))
                r.metrics.log(st.step, last_detect)
        # ---- end of epoch: divergence, detectors, eval, log, checkpoint ----
        loss_sum, acc = meter.read()
        perf = meter.perf()
        r.perf.append(perf)
        stop_if_diverged(r, loss_sum, epoch, lr, weights=True)  # never checkpoint non-finite weights
        logs = {"train/loss": loss_sum / max(meter.seen, 1), "train/acc": acc, "epoch": epoch + 1,
                "pst/stage": stage.index, **{f"pst/group_{i}/lr_mult": m for i, m in enumerate(stage.mults)}}
        if not cfg.schedule.check_every:
            last_detect = detect(r, schedule.stage_at(st.step, st.history))
            logs.update(last_detect)
        last = epoch + 1 == cfg.train.epochs
        if (epoch + 1) % cfg.train.eval_every == 0 or last:
            views = cfg.schedule.eval_views
            logs["eval/val_acc"] = evaluate(model, s.val.images, s.val.labels, r.normalize, r.device, views=views)
            logs["eval/test_acc"] = evaluate(model, s.test.images, s.test.labels, r.normalize, r.device, views=views)
        r.metrics.log(st.step, {**logs, **perf})
        st.records.append({k: v for k, v in logs.items() if isinstance(v, int | float)})
        st.epoch = epoch + 1
        if last or (cfg.train.checkpoint_every and (epoch + 1) % cfg.train.checkpoint_every == 0):
            r.metrics.flush()  # what a resume from this checkpoint finds logged (Metrics' resumed_at)
            r.engine.save(r.run_dir, st.to_dict(), cfg.model.name, r.dist.is_primary)
            st.saved_epoch = epoch + 1
        if on_epoch is not None:
            on_epoch(epoch + 1, logs, r.gm, r.engine)
        if r.dist.is_primary:
            tqdm.write(f"[{r.run_dir.name}] epoch {epoch + 1}: loss {logs['train/loss']:.3f} "
                       f"train {logs['train/acc']:.3f} val {_measured(logs.get('eval/val_acc'), '.3f')} "
                       f"test {_measured(logs.get('eval/test_acc'), '.3f')} stage {stage.index}"
                       f"{' (stayed)' * stage.stayed} "
                       f"gap {_measured(last_detect.get('detect/shortcut_gap'), '+.3f')} | "
                       f"{perf['perf/img_per_s']:,.0f} img/s, data wait {100 * perf['perf/data_wait']:.0f}%")
        if stop_after_epochs is not None and epoch + 1 >= stop_after_epochs:
            break
    return finish_run(r)


def _measured(v, form: str) -> str:
    """A figure of the epoch line, or "-" where nothing was measured (no split, no detector check yet)."""
    return format(v, form) if isinstance(v, int | float) and math.isfinite(v) else "-"


def finish_run(r: Run) -> dict:
    """The summary (written by the primary rank), then close metrics and the process group."""
    summary = {**summarize(r.state.to_dict()), "status": "finished",
               "throughput": throughput(r.perf) or recorded_throughput(r.run_dir)}
    with r.engine.gathered():
        summary["model_checksum"] = float(sum(p.detach().double().abs().sum() for p in r.gm.model.parameters()))
    summary["world_size"] = r.dist.world_size
    if r.dist.is_primary:
        write_atomic(r.run_dir / "summary.json", json.dumps(summary, indent=2))
    try:
        r.metrics.close()
    finally:  # every rank reaches teardown's barrier, also when rank 0 cannot close a tracker's run
        teardown()
    return summary


def recorded_throughput(run_dir: Path) -> dict:
    """The throughput the run's summary.json records ({} without one): what a resume at the run's end, which
    trains no epoch to measure, keeps."""
    try:
        measured = read_json(run_dir / "summary.json", "the run's summary").get("throughput")
    except OutputError:
        return {}
    return measured if isinstance(measured, dict) else {}


def throughput(perf: list[dict]) -> dict:
    """This process's epochs' throughput, averaged over all but the first (warm-up, compiling) when there are more;
    peak memory over all. Empty for a run resumed at its end (:func:`recorded_throughput` then)."""
    if not perf:
        return {}
    timed = perf[1:] or perf
    out = {k[len("perf/"):]: sum(p[k] for p in timed) / len(timed)
           for k in ("perf/img_per_s", "perf/step_ms", "perf/data_wait")}
    out["peak_mem_gb"] = max(p["perf/peak_mem_gb"] for p in perf)
    out["compiles"] = perf[-1]["perf/compiles"]
    out["epochs_timed"] = len(timed)
    return out


def summarize(st: dict) -> dict:
    recs = [r for r in st["records"] if "eval/test_acc" in r]
    best_val = max(recs, key=lambda r: r["eval/val_acc"]) if recs else {}
    peak = max(recs, key=lambda r: r["eval/test_acc"]) if recs else {}
    return {
        "final_test_acc": recs[-1]["eval/test_acc"] if recs else float("nan"),
        "final_val_acc": recs[-1]["eval/val_acc"] if recs else float("nan"),
        "peak_test_acc": peak.get("eval/test_acc", float("nan")),
        "peak_epoch": peak.get("epoch"),
        "best_val_epoch": best_val.get("epoch"),
        "test_acc_at_best_val": best_val.get("eval/test_acc"),
        "stage_history": st["history"],
        "test_curve": [r["eval/test_acc"] for r in recs],
        "val_curve": [r["eval/val_acc"] for r in recs],
        "train_acc_curve": [r["train/acc"] for r in st["records"]],
        "steps": st["step"],
    }

