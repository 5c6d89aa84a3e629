"""Distributed setup in one place: the same entry point runs under python, torchrun, the deepspeed launcher and
Ray Train workers, all of which set RANK / WORLD_SIZE / LOCAL_RANK (and MASTER_ADDR / MASTER_PORT)."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from .checkpoint import CheckpointError, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .config import ConfigError
from .io import save_stream_atomic
from .pst.freeze import drop_frozen_grads


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int

    @property
    def is_primary(self) -> bool:
        return self.rank == 0


_OWN_GROUP = False  # whether this module created the process group (Ray Train creates and destroys its own)


def build_device(cfg) -> torch.device:
    """``train.device``: auto (CUDA when there is a GPU) | cpu | cuda."""
    if cfg.train.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.train.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device='cuda' but no CUDA device is available")
    return torch.device(cfg.train.device)


def init_distributed(device: str, single_process_group: bool = False) -> DistInfo:
    """Read the launcher's environment; join the process group when there is more than one process.

    ``single_process_group``: also create a one-process group when no launcher set one up (DeepSpeed needs a
    process group, and without RANK / WORLD_SIZE in the environment it would try MPI discovery)."""
    global _OWN_GROUP
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cuda":
        torch.cuda.set_device(local)
    if (world > 1 or single_process_group) and not dist.is_initialized():
        backend = "nccl" if device == "cuda" else "gloo"
        if world > 1 or "MASTER_ADDR" in os.environ:
            dist.init_process_group(backend=backend, rank=rank, world_size=world)
        else:  # DeepSpeed also reads these
            os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
            dist.init_process_group(backend=backend, rank=0, world_size=1, init_method=f"tcp://127.0.0.1:{_free_port()}")
        _OWN_GROUP = True
    return DistInfo(rank, world, local)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def all_reduce_grads(params, world_size: int) -> None:
    """Average gradients across ranks (plain data parallelism; the DeepSpeed engine does this itself)."""
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= world_size


def broadcast_buffers(module: torch.nn.Module) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics) to every rank, as DDP does before each forward: each
    rank's batches would otherwise drift its statistics apart, and frozen BatchNorm (eval mode) would then compute
    different functions on different ranks, and a resume (from rank 0's checkpoint) would not reproduce rank 1."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for b in module.buffers():
        by_dtype.setdefault(b.dtype, []).append(b)
    for bufs in by_dtype.values():
        flat = torch._utils._flatten_dense_tensors([b.detach() for b in bufs])
        dist.broadcast(flat, src=0)
        for b, v in zip(bufs, torch._utils._unflatten_dense_tensors(flat, bufs), strict=True):
            b.copy_(v)


def mean_across_ranks(value: float) -> float:
    """The mean of a scalar over all ranks (the value itself on one process)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    t = torch.tensor([float(value)], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t) / dist.get_world_size()


def teardown() -> None:
    """Leave the process group this module created (one that Ray Train set up is Ray's to destroy)."""
    global _OWN_GROUP
    if dist.is_initialized():
        dist.barrier()
        if _OWN_GROUP:
            dist.destroy_process_group()
            _OWN_GROUP = False


# ---------------------------------------------------------------------------------------------------------------
# Engines: the trainer talks to one of these; PST freezing is the same for both (one param group per layer group,
# lr and weight decay 0 while frozen, no backward through the frozen prefix), so it holds under every ZeRO stage.


class TorchEngine:
    """Plain torch: the optimizer as built, gradients averaged by all-reduce when there is more than one process."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, world_size: int):
        self.module, self.optimizer, self.world_size = model, optimizer, world_size

    def backward(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()

    def step(self, mults: tuple[float, ...]) -> None:
        drop_frozen_grads(self.optimizer, mults)
        if self.world_size > 1:
            all_reduce_grads(self.module.parameters(), self.world_size)
        self.optimizer.step()

    def gathered(self):
        return contextlib.nullcontext()

    def module_changed(self) -> None:
        """Parameters were modified in place (head re-init): nothing to resynchronise here."""

    def save(self, run_dir: Path, state: dict, model_name: str, is_primary: bool) -> None:
        if is_primary:
            save_checkpoint(run_dir / "checkpoint.pt", self.module, self.optimizer, state, model_name)

    def load(self, run_dir: Path, model_name: str) -> dict:
        return load_checkpoint(run_dir / "checkpoint.pt", self.module, self.optimizer, model_name)


class DeepSpeedEngine:
    """A DeepSpeed engine around the model and the torch optimizer (per-layer-group param groups), ZeRO 0-3.

    Checkpoints go through ``engine.save_checkpoint`` / ``load_checkpoint`` under ``<run_dir>/ds_checkpoint`` with
    the trainer state as client state and each rank's RNG beside it; before DeepSpeed unpickles them (it does so
    without ``weights_only``), every file is checked to reference only allow-listed globals.
    """

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

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def step(self, mults: tuple[float, ...]) -> None:
        if self.zero_stage == 0 and not (self.cfg.deepspeed.bf16 or self.cfg.deepspeed.fp16):
            from .pst.freeze import drop_frozen_grads  # the torch optimizer itself: keep frozen moments still

            drop_frozen_grads(self.optimizer, mults)
        boundary = self.engine.is_gradient_accumulation_boundary()
        self.engine.step()
        flat = getattr(self.optimizer, "grad_partitions_flat_buffer", None)  # ZeRO-3
        if boundary and flat is not None:
            # ZeRO-3 overwrites the gradient partitions of parameters that received a gradient and leaves the others
            # as they were: a frozen group (no backward through it) would feed its last trainable-stage gradient
            # to Adam's moments at every frozen step, and a resumed run (zeros) would not reproduce that.
            flat.zero_()

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
        ckpt = run_dir / "ds_checkpoint"
        tag = f"step{state['step']}"
        self.engine.save_checkpoint(str(ckpt), tag=tag, client_state={"pst_state": state, "model_name": model_name})

        save_stream_atomic(ckpt / tag / f"rng_rank{self.info.rank}.pt", lambda f: torch.save(rng_state(), f))
        if dist.is_initialized():
            dist.barrier()
        if is_primary:  # keep the newest two tags ('latest' names the newest)

            tags = sorted((p for p in ckpt.glob("step*") if p.is_dir()), key=lambda p: int(p.name[4:]))
            for old in tags[:-2]:
                shutil.rmtree(old, ignore_errors=True)

    def load(self, run_dir: Path, model_name: str) -> dict:
        ckpt = run_dir / "ds_checkpoint"
        latest = ckpt / "latest"
        if not latest.is_file():
            raise CheckpointError(f"no DeepSpeed checkpoint to resume from under {ckpt}")
        tag = latest.read_text().strip()
        check_ds_checkpoint(ckpt / tag)
        path, client = self.engine.load_checkpoint(str(ckpt), tag=tag)
        if path is None:
            raise CheckpointError(f"{ckpt / tag}: DeepSpeed could not load it")
        if client.get("model_name") != model_name:
            raise CheckpointError(f"{ckpt / tag}: checkpoint is of model {client.get('model_name')!r}, config says "
                                  f"{model_name!r}")
        set_rng_state(torch.load(ckpt / tag / f"rng_rank{self.info.rank}.pt", weights_only=True))
        return client["pst_state"]


# Globals DeepSpeed's own checkpoints reference (besides tensors and containers). Anything else in a checkpoint
# file is refused before DeepSpeed's unrestricted torch.load sees it.
DS_SAFE_GLOBALS = {  # beyond torch's own weights_only allow-list
    "deepspeed.runtime.fp16.loss_scaler.LossScaler", "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum", "deepspeed.utils.tensor_fragment.fragment_address",
}


def check_ds_checkpoint(tag_dir: Path) -> None:
    """Refuse a DeepSpeed checkpoint file that references globals outside :data:`DS_SAFE_GLOBALS`."""

    files = sorted(tag_dir.glob("*.pt"))
    if not files:
        raise CheckpointError(f"{tag_dir}: no checkpoint files")
    for f in files:
        try:
            unsafe = set(torch.serialization.get_unsafe_globals_in_checkpoint(str(f)))
        except Exception as e:  # noqa: BLE001 - unreadable is refused
            raise CheckpointError(f"{f}: not a readable checkpoint ({type(e).__name__}: {e})") from None
        bad = sorted(unsafe - DS_SAFE_GLOBALS)
        if bad:
            raise CheckpointError(f"{f}: references globals outside the DeepSpeed allow-list: {bad}")


def deepspeed_config(cfg, world_size: int, num_params: int | None = None) -> dict:
    """The ``[deepspeed]`` section (and train.batch_size as the per-process micro-batch) as a DeepSpeed config."""
    d = cfg.deepspeed
    zero: dict = {"stage": d.zero_stage}
    bucket = d.bucket_size or (min(500_000_000, max(num_params, 1_000_000)) if num_params else 0)
    if bucket and d.zero_stage >= 1:
        zero.update(reduce_bucket_size=bucket, allgather_bucket_size=bucket)
        if d.zero_stage == 3:
            zero.update(stage3_prefetch_bucket_size=bucket)
    if d.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
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
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


def build_engine(cfg, model: torch.nn.Module, optimizer: torch.optim.Optimizer, info: DistInfo):
    if cfg.deepspeed.enabled:
        return DeepSpeedEngine(cfg, model, optimizer, info)
    return TorchEngine(model, optimizer, info.world_size)
