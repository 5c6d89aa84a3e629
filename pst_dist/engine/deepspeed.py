"""The DeepSpeed engine (ZeRO 0-3) and its checkpoint layout: ``<run_dir>/ds_checkpoint/step<N>/`` per checkpoint
(DeepSpeed's model and optimizer states, each rank's RNG beside them; the newest two kept), ``ds_checkpoint/latest``
naming the newest (written by rank 0). DeepSpeed itself is imported only when an engine is built."""

from __future__ import annotations

import contextlib
import importlib
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from ..checkpoint import CheckpointError, load_mapped, rng_state, set_rng_state
from ..distributed import DistInfo
from ..io import fsync_tree, load_failure, remove_stale, save_stream_atomic, write_atomic
from ..pst.freeze import drop_frozen_grads
from .base import Engine

CHECKPOINT_DIR = "ds_checkpoint"
LATEST = "latest"
MODEL_STATES = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")
"""Rank 0's model-states file (ZeRO 0-2, ZeRO-3): it carries the trainer state as DeepSpeed client state."""


class DeepSpeedEngine(Engine):
    """A DeepSpeed engine around the model and the torch optimizer (per-layer-group param groups), ZeRO 0-3.

    Checkpoints go through ``engine.save_checkpoint`` / ``load_checkpoint`` under ``<run_dir>/ds_checkpoint`` with
    the trainer state as client state and each rank's RNG beside it; before DeepSpeed unpickles them (it does so
    without ``weights_only``), every file is checked to reference only allow-listed globals.

    With optimizer offload (ZeRO 1-3) DeepSpeed steps the same torch optimizer on the CPU, its param groups holding
    the fp32 master partitions instead of the model's parameters: ``optimizer.param_groups`` (which ``set_group_lrs``
    writes) are still the groups that step, so a frozen group keeps lr 0 and weight decay 0.
    """

    REWRITTEN_IN_PLACE = (f"{CHECKPOINT_DIR}/{LATEST}",)  # replaced at every save (a few bytes: copied)

    def __init__(self, cfg, model: torch.nn.Module, optimizer: torch.optim.Optimizer, info: DistInfo):
        import deepspeed  # optional heavy dependency (DeepSpeed), imported only when enabled

        self.cfg, self.info = cfg, info
        self.zero_stage = cfg.deepspeed.zero_stage
        ds_config = deepspeed_config(cfg, info.world_size, sum(p.numel() for p in model.parameters()))
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
        self.module = self.engine.module
        if cfg.deepspeed.bf16 or cfg.deepspeed.fp16:
            # DeepSpeed casts parameters, not buffers: BatchNorm needs its running statistics in the same dtype
            dtype = torch.bfloat16 if cfg.deepspeed.bf16 else torch.float16
            for b in self.module.buffers():
                if b.is_floating_point():
                    b.data = b.data.to(dtype)

    def backward(self, loss: torch.Tensor, mults: tuple[float, ...] | None = None) -> None:
        """``mults`` is accepted for the interface and ignored: DeepSpeed buckets and overlaps its own reduction."""
        self.engine.backward(loss)

    def step(self, mults: tuple[float, ...]) -> None:
        if self.zero_stage == 0 and not (self.cfg.deepspeed.bf16 or self.cfg.deepspeed.fp16):
            drop_frozen_grads(self.optimizer, mults)  # the torch optimizer itself: keep frozen moments still
        boundary = self.engine.is_gradient_accumulation_boundary()
        self.engine.step()
        if boundary:
            # These buffers outlive the step and the next one overwrites only the slices of parameters that received
            # a gradient: a frozen group (no backward through it) would feed its last trainable-stage gradient to
            # Adam's moments at every frozen step, and a resumed run (zeros) would not reproduce that.
            for buf in _persistent_grad_buffers(self.optimizer):
                buf.zero_()

    def gathered(self):
        """Full parameters on every rank (ZeRO-3 partitions them); modifications made inside are kept."""
        if self.zero_stage != 3:
            return contextlib.nullcontext()
        import deepspeed  # optional heavy dependency (DeepSpeed), imported only when enabled

        return deepspeed.zero.GatheredParameters(list(self.module.parameters()), modifier_rank=0)

    def module_changed(self) -> None:
        """Copy in-place parameter changes into the optimizer's fp32 master partitions (ZeRO >= 1 or bf16/fp16),
        or the next step would write the old weights back."""
        restore = getattr(self.optimizer, "_restore_from_bit16_weights", None)
        if restore is not None:
            restore()

    def save(self, run_dir: Path, state: dict, model_name: str, is_primary: bool) -> None:
        ckpt = run_dir / CHECKPOINT_DIR
        tag = f"step{state['step']}"
        # this rank's RNG first: 'latest', written last, then names a checkpoint a kill cannot leave without it
        (ckpt / tag).mkdir(parents=True, exist_ok=True)
        save_stream_atomic(ckpt / tag / f"rng_rank{self.info.rank}.pt", lambda f: torch.save(rng_state(), f))
        # 'latest' is ours to write: DeepSpeed writes it in place, unflushed, and a power loss could then leave it
        # empty, or naming a tag whose files never reached the disk, after the tags before it were removed
        self.engine.save_checkpoint(str(ckpt), tag=tag, client_state={"pst_state": state, "model_name": model_name},
                                    save_latest=False)
        if self.info.local_rank == 0:  # once per node: the node's page cache holds what each of its ranks wrote
            fsync_tree(ckpt / tag)
        if dist.is_initialized():
            dist.barrier()
        if is_primary:  # 'latest' names the new tag once every rank's files are on disk
            remove_stale(ckpt, [LATEST], "tmp")  # a 'latest' of a save that was killed
            write_atomic(ckpt / LATEST, tag)
        if dist.is_initialized():  # every rank finds the new 'latest' once the save returns
            dist.barrier()
        if is_primary:  # the newest two tags stay
            for old in checkpoint_tags(ckpt)[:-2]:
                shutil.rmtree(old, ignore_errors=True)

    def load(self, run_dir: Path, model_name: str) -> dict:
        ckpt = run_dir / CHECKPOINT_DIR
        tag = _latest(run_dir)
        if tag is None:
            raise CheckpointError(f"no DeepSpeed checkpoint to resume from under {ckpt}")
        check_ds_checkpoint(ckpt / tag)
        path, client = self.engine.load_checkpoint(str(ckpt), tag=tag)
        if path is None:
            raise CheckpointError(f"{ckpt / tag}: DeepSpeed could not load it")
        if client.get("model_name") != model_name:
            raise CheckpointError(f"{ckpt / tag}: checkpoint is of model {client.get('model_name')!r}, config says "
                                  f"{model_name!r}")
        rng = ckpt / tag / f"rng_rank{self.info.rank}.pt"
        try:
            saved = torch.load(rng, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - a missing or unreadable file is a bad checkpoint
            raise CheckpointError(f"{rng}: not a readable random-number state ({load_failure(e)})") from None
        set_rng_state(saved, rng)
        if not isinstance(client.get("pst_state"), dict):
            raise CheckpointError(f"{ckpt / tag}: holds no pst-dist trainer state (client_state 'pst_state')")
        return client["pst_state"]

    # ---- the checkpoint layout

    @classmethod
    def has_checkpoint(cls, run_dir: Path) -> bool:
        return _latest(Path(run_dir)) is not None

    @classmethod
    def checkpoint_files(cls, run_dir: Path, primary: bool = True) -> list[Path]:
        run_dir = Path(run_dir)
        tag = _latest(run_dir)
        if tag is None and not primary:  # rank 0 writes 'latest': another node holds only its ranks' tag folders
            tags = checkpoint_tags(run_dir / CHECKPOINT_DIR)
            tag = tags[-1].name if tags else None
        if tag is None:
            return []
        tag_dir = run_dir / CHECKPOINT_DIR / tag
        files = sorted(p.relative_to(run_dir) for p in tag_dir.rglob("*") if p.is_file())
        if files and primary:
            files.append(Path(CHECKPOINT_DIR) / LATEST)
        return files

    @classmethod
    def checkpoint_epoch(cls, run_dir: Path) -> int | None:
        tag = _latest(Path(run_dir))
        if tag is None:
            return None
        tag_dir = Path(run_dir) / CHECKPOINT_DIR / tag
        found = [tag_dir / n for n in MODEL_STATES if (tag_dir / n).is_file()]
        if not found:
            raise CheckpointError(f"{tag_dir}: no model states file ({' or '.join(MODEL_STATES)})")
        try:  # restricted to the allow-list (no separate scan needed); memory-mapped, tensors unread
            client = load_ds_file(found[0])
            return int(client["pst_state"]["epoch"])
        except Exception as e:  # noqa: BLE001 - any unpickling failure or missing key is a bad file
            raise CheckpointError(f"{found[0]}: not a readable pst-dist DeepSpeed checkpoint "
                                  f"({load_failure(e)})") from None

    @classmethod
    def clear_checkpoint(cls, run_dir: Path) -> None:
        shutil.rmtree(Path(run_dir) / CHECKPOINT_DIR, ignore_errors=True)  # tags newer than a restored one are stale


def _persistent_grad_buffers(optimizer) -> list[torch.Tensor]:
    """The gradient buffers a ZeRO optimizer keeps from one step to the next: ZeRO-3's flat gradient partitions and,
    with optimizer offload, the CPU gradients of the fp32 master partitions the torch optimizer steps on
    (``single_partition_of_fp32_groups`` under ZeRO 1-2, ``fp32_partitioned_groups_flat`` under ZeRO-3). Without
    offload DeepSpeed frees the latter after each step (``.grad`` is None) and rebuilds them, zeros for a parameter
    without a gradient."""
    bufs = []
    flat = getattr(optimizer, "grad_partitions_flat_buffer", None)
    if flat is not None:
        bufs.append(flat)
    for name in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat"):
        bufs += [t.grad for t in getattr(optimizer, name, None) or () if t.grad is not None]
    return bufs


def _latest(run_dir: Path) -> str | None:
    """The tag 'latest' names (None without one)."""
    f = run_dir / CHECKPOINT_DIR / LATEST
    return (f.read_text().strip() or None) if f.is_file() else None


def checkpoint_tags(ckpt: Path) -> list[Path]:
    """The checkpoint tag folders under ``ckpt``, oldest first."""
    return sorted((p for p in ckpt.glob("step*") if p.is_dir() and p.name[4:].isdigit()), key=lambda p: int(p.name[4:]))


# Globals DeepSpeed's own checkpoints reference (besides tensors and containers). Anything else in a checkpoint
# file is refused before DeepSpeed's unrestricted torch.load sees it.
DS_SAFE_GLOBALS = {  # beyond torch's own weights_only allow-list
    "deepspeed.runtime.fp16.loss_scaler.LossScaler", "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum", "deepspeed.utils.tensor_fragment.fragment_address",
}


def _check_file(f: Path) -> None:
    try:
        unsafe = set(torch.serialization.get_unsafe_globals_in_checkpoint(str(f)))
    except Exception as e:  # noqa: BLE001 - unreadable is refused
        raise CheckpointError(f"{f}: not a readable checkpoint ({load_failure(e)})") from None
    bad = sorted(unsafe - DS_SAFE_GLOBALS)
    if bad:
        raise CheckpointError(f"{f}: references globals outside the DeepSpeed allow-list: {bad}")


def load_ds_file(f: Path):
    """:func:`pst_dist.checkpoint.load_mapped` of a DeepSpeed checkpoint file (weights only, memory-mapped: what is
    not read stays on disk), allowing :data:`DS_SAFE_GLOBALS` beside torch's own allow-list (what pst-dist reads
    itself; DeepSpeed's loaders read after :func:`check_ds_checkpoint`)."""
    allowed = [getattr(importlib.import_module(m), a) for m, _, a in (g.rpartition(".") for g in DS_SAFE_GLOBALS)]
    with torch.serialization.safe_globals(allowed):
        return load_mapped(f)


def check_ds_checkpoint(tag_dir: Path) -> None:
    """Refuse a DeepSpeed checkpoint file that references globals outside :data:`DS_SAFE_GLOBALS`."""
    files = sorted(tag_dir.glob("*.pt"))
    if not files:
        raise CheckpointError(f"{tag_dir}: no checkpoint files")
    for f in files:
        _check_file(f)


def deepspeed_config(cfg, world_size: int, num_params: int | None = None) -> dict:
    """The ``[deepspeed]`` section (and train.batch_size as the per-process micro-batch) as a DeepSpeed config."""
    d = cfg.deepspeed
    zero: dict = {"stage": d.zero_stage}
    bucket = d.bucket_size or (min(500_000_000, max(num_params, 1_000_000)) if num_params else 0)
    if bucket and d.zero_stage >= 1:
        zero.update(reduce_bucket_size=bucket, allgather_bucket_size=bucket)
        if d.zero_stage == 3:
            zero.update(stage3_prefetch_bucket_size=bucket)
    offload = {}
    if d.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
        # DeepSpeed refuses a torch optimizer with optimizer offload unless told otherwise (it would rather have its
        # DeepSpeedCPUAdam); ours carries the per-layer-group param groups PST freezes by, and ZeRO steps it on the
        # fp32 CPU partitions inside those same groups, so the per-step lr / weight decay still reach it
        offload["zero_force_ds_cpu_optimizer"] = False
    if d.offload_param:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if d.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    return {
        "train_micro_batch_size_per_gpu": cfg.train.batch_size,
        "gradient_accumulation_steps": d.grad_accum,
        "train_batch_size": cfg.train.batch_size * d.grad_accum * world_size,
        "gradient_clipping": d.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": d.bf16},
        "fp16": {"enabled": d.fp16},
        "zero_allow_untested_optimizer": True,  # the torch optimizer with per-layer-group param groups
        **offload,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
