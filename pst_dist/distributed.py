"""Distributed setup in one place: the same entry point runs under python, torchrun, the deepspeed launcher and
Ray Train workers, all of which set RANK / WORLD_SIZE / LOCAL_RANK (and MASTER_ADDR / MASTER_PORT). The engines
that train on top of it (torch, DeepSpeed) are in :mod:`pst_dist.engine`."""

from __future__ import annotations

import functools
import os
import socket
import sys
import weakref
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .config import ConfigError


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int

    @property
    def is_primary(self) -> bool:
        return self.rank == 0


_OWN_GROUP = False  # whether this module created the process group (Ray Train creates and destroys its own)
_LAUNCHER_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE")
_ENV_BEFORE: dict[str, str | None] = {}  # the launcher variables a one-process group set, and what they were before


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
        else:  # DeepSpeed also reads these; teardown puts back what was there (a bench or search runs many in-process)
            for k in _LAUNCHER_VARS:  # the first value seen is the one to put back
                _ENV_BEFORE.setdefault(k, os.environ.get(k))
            os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
            try:
                dist.init_process_group(backend=backend, rank=0, world_size=1,
                                        init_method=f"tcp://127.0.0.1:{_free_port()}")
            except BaseException:
                _forget_own_group()
                raise
        _OWN_GROUP = True
    return DistInfo(rank, world, local)


def init_ray() -> str:
    """Join the Ray cluster ``RAY_ADDRESS`` names (``ray job submit`` sets it; tune/run.py under ``ray submit``), or
    else start a new local Ray of this process's own (``address="local"``: never a cluster someone else started on
    this machine; ``ray.shutdown()`` stops it); nothing when this process has joined a Ray already. Returns where,
    for the log."""
    import ray  # optional heavy dependency (Ray), imported only by the Ray paths (tune, bench.runner = "ray")

    if ray.is_initialized():
        return "the Ray this process has joined"
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True)
        return f"cluster at {os.environ['RAY_ADDRESS']}"
    ray.init(address="local", dashboard_host="127.0.0.1", include_dashboard=None)
    return "a new local Ray (dashboard on 127.0.0.1)"


def join_cluster_here(script: str, command: str) -> str | None:
    """For an entry point ``ray submit`` runs on the head node (``tune/run.py``, ``launch/bench_ray.py``): set
    RAY_ADDRESS to the cluster ``ray start`` started on this node when it is unset (only ``ray job submit`` sets it);
    returns the line to print, or None when RAY_ADDRESS was set. ConfigError when no cluster runs here, or the one
    recorded does not answer: :func:`init_ray` would start a private Ray, and ``pst-dist {command}`` would run all
    its work on this one node (and find no GPU on a head without one)."""
    if os.environ.get("RAY_ADDRESS"):
        return None
    # where `ray start` records it (under RAY_TMPDIR, else TMPDIR, else /tmp: ray/ray_current_cluster); private, as
    # ray 2.60.0 (pinned) has them
    from ray._common.utils import get_ray_address_file  # optional heavy dependency (Ray), only on this path
    from ray._private.utils import read_ray_address  # optional heavy dependency (Ray), only on this path

    address = read_ray_address()
    if not address:
        raise ConfigError(f"{script} runs on a running Ray cluster: RAY_ADDRESS is unset and no `ray start` ran on "
                          f"this machine ({get_ray_address_file(None)} not found; a head started with "
                          f"--temp-dir=DIR records DIR/ray_current_cluster instead: set RAY_ADDRESS=<head>:<port>); "
                          f"use `ray submit` / `ray job submit` onto a cluster, or `pst-dist {command}` on a local "
                          f"Ray of its own")
    host, _, port = address.rpartition(":")
    try:  # a cluster stopped without `ray stop` (a crash) leaves its file: say so, not a ConnectionError later
        socket.create_connection((host, int(port)), timeout=5).close()
    except (OSError, ValueError):
        raise ConfigError(f"the Ray cluster recorded on this machine, at {address} (ray_current_cluster in Ray's "
                          f"temp dir), does not answer: stopped without `ray stop`? Start it again (`ray start "
                          f"--head`, or `ray up`) or set RAY_ADDRESS") from None
    os.environ["RAY_ADDRESS"] = address
    return f"[{command}] RAY_ADDRESS unset (ray submit): joining the Ray cluster started on this node, at {address}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def all_reduce_grads(params, world_size: int) -> None:
    """Average gradients across ranks one parameter at a time, after backward (the surrogate trainer of
    :mod:`pst_dist.poison.model_based`; the torch engine uses :class:`GradBuckets`, DeepSpeed does this itself)."""
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= world_size


def plan_buckets(params: list[torch.Tensor], bucket_bytes: int) -> list[list[torch.Tensor]]:
    """Cut ``params`` (in the order given) into buckets of one device and dtype each (one flat buffer per bucket),
    a bucket closed once it holds at least ``bucket_bytes``; the partly filled ones come last."""
    buckets: list[list[torch.Tensor]] = []
    open_: dict[tuple, tuple[list[torch.Tensor], int]] = {}
    for p in params:
        key = (p.device, p.dtype)
        members, size = open_.get(key, ([], 0))
        members.append(p)
        size += p.numel() * p.element_size()
        if size >= bucket_bytes:
            buckets.append(members)
            members, size = [], 0
        open_[key] = (members, size)
    return buckets + [members for members, _ in open_.values() if members]


class _Bucket:
    """Parameters whose gradients travel in one flat all-reduce; ``pending`` holds the positions not yet ready."""

    def __init__(self, params: list[torch.Tensor]):
        self.params = params
        self.reset()

    def reset(self) -> None:
        self.pending = set(range(len(self.params)))
        self.sent: list[torch.Tensor] = []  # the parameters whose gradients are in ``flat``
        self.flat: torch.Tensor | None = None
        self.work = None


def _grad_ready(ref: weakref.ref, bucket: int, position: int, _param: torch.Tensor) -> None:
    """The post-accumulate-grad hook; a weak reference, so that a dropped engine's hooks go with it."""
    owner = ref()
    if owner is not None:
        owner._ready(bucket, position)


class GradBuckets:
    """Gradient averaging for plain data parallelism, DDP-style, on an unwrapped model (state_dict keys, checkpoints
    and hooks on submodules unchanged): the trainable parameters, in reverse registration order (roughly the order
    their gradients become ready in backward), are cut into buckets of about ``bucket_bytes``; a
    post-accumulate-grad hook marks a parameter ready, and a bucket whose parameters are all ready is flattened and
    all-reduced asynchronously while backward goes on. :meth:`finish` (before the optimizer step) launches what
    never became complete, waits, and writes the sums divided by the world size back into ``.grad``.

    Use: :meth:`arm` ``(mults)`` before ``loss.backward()``, :meth:`finish` ``(mults)`` after it. Only parameters of
    groups with a non-zero lr multiplier (optimizer param groups carry ``layer_group``, the index into ``mults``)
    take part: frozen groups are never all-reduced (their gradients are dropped, as
    :func:`pst_dist.pst.freeze.drop_frozen_grads` does). Buckets and hooks are rebuilt only when the set of trainable
    groups changes. :meth:`finish` without :meth:`arm` buckets every non-None gradient after backward.

    Assumes every rank runs the same model under the same stage, so the same parameters get a gradient on every rank
    (a parameter with no gradient anywhere keeps ``.grad`` None; one with a gradient on some ranks only would make
    the collectives mismatch). Buckets are launched in bucket order, whatever order the hooks fire in, so that the
    ranks issue the same collectives in the same order. The result is the per-parameter one bit for bit on two
    ranks (each element is the same sum of two values, then the same division); with more ranks the collective's
    summation order may depend on where an element sits in the buffer, so it can differ in the last bits (still the
    same on every rank). One backward per step: a parameter whose hook fires twice before :meth:`finish` (gradient
    accumulation) is an error, its first gradient being already on the wire.
    """

    def __init__(self, module: torch.nn.Module, optimizer: torch.optim.Optimizer, world_size: int,
                 bucket_bytes: int = 25 * 2**20, group=None):
        self.module, self.optimizer, self.world_size = module, optimizer, world_size
        self.bucket_bytes, self.group = bucket_bytes, group
        self.buckets: list[_Bucket] = []
        self.trainable: frozenset[int] | None = None  # the layer groups the buckets were built for
        self.armed = False
        self._next = 0  # buckets before this index have been launched (launches go in bucket order)
        self._handles: list = []
        weakref.finalize(self, _remove_hooks, self._handles)

    @property
    def launched(self) -> int:
        """How many buckets have been launched in the current step (during backward, until :meth:`finish`)."""
        return self._next

    def arm(self, mults: tuple[float, ...]) -> None:
        """Before ``loss.backward()``: (re)build the buckets if the trainable groups changed, start a new step."""
        self._drain()
        trainable = _trainable_groups(mults)
        if trainable != self.trainable:
            self._build(trainable)
        self.armed = True

    def finish(self, mults: tuple[float, ...] | None = None) -> None:
        """After backward, before the optimizer step: every bucket launched (those that never became complete now,
        with the gradients they have), waited on, and the averages written back into ``.grad``."""
        if not self.armed:
            self._reduce_after_backward()
            return
        if mults is not None and _trainable_groups(mults) != self.trainable:
            self._drain()
            raise ValueError(f"step under lr multipliers {tuple(mults)} trains other layer groups than backward was "
                             f"armed for ({sorted(self.trainable)}): pass the same stage's mults to both")
        while self._next < len(self.buckets):
            self._launch(self.buckets[self._next])
            self._next += 1
        self._complete(self.buckets)
        self.armed = False

    def remove(self) -> None:
        """Take the hooks off the parameters."""
        self._drain()
        _remove_hooks(self._handles)
        self.buckets, self.trainable = [], None

    # ---- internals

    def _build(self, trainable: frozenset[int]) -> None:
        _remove_hooks(self._handles)
        ids = {id(p) for pg in self.optimizer.param_groups if pg["layer_group"] in trainable for p in pg["params"]}
        params = [p for p in reversed(list(self.module.parameters())) if id(p) in ids and p.requires_grad]
        self.buckets = [_Bucket(b) for b in plan_buckets(params, self.bucket_bytes)]
        ref = weakref.ref(self)
        for i, b in enumerate(self.buckets):
            for j, p in enumerate(b.params):
                self._handles.append(p.register_post_accumulate_grad_hook(functools.partial(_grad_ready, ref, i, j)))
        self.trainable = trainable

    def _ready(self, bucket: int, position: int) -> None:
        if not self.armed:  # a backward outside a training step (an attack, a probe): not ours to reduce
            return
        b = self.buckets[bucket]
        if position not in b.pending:
            raise RuntimeError("a parameter received a second gradient before the optimizer step: GradBuckets "
                               "supports one backward per step (no gradient accumulation)")
        b.pending.discard(position)
        while self._next < len(self.buckets) and not self.buckets[self._next].pending:
            self._launch(self.buckets[self._next])
            self._next += 1

    def _launch(self, b: _Bucket) -> None:
        b.sent = [p for p in b.params if p.grad is not None]
        if b.sent:
            with torch.no_grad():
                b.flat = torch.cat([p.grad.reshape(-1) for p in b.sent])
            b.work = dist.all_reduce(b.flat, group=self.group, async_op=True)

    def _complete(self, buckets: list[_Bucket]) -> None:
        with torch.no_grad():
            for b in buckets:
                if b.work is not None:
                    b.work.wait()
                    b.flat.div_(self.world_size)
                    for p, avg in zip(b.sent, b.flat.split([p.numel() for p in b.sent]), strict=True):
                        p.grad.copy_(avg.view_as(p.grad))
                b.reset()
        self._next = 0

    def _drain(self) -> None:
        """Wait for collectives a step left in flight (a backward that raised) and forget that step."""
        for b in self.buckets:
            if b.work is not None:
                b.work.wait()
            b.reset()
        self._next, self.armed = 0, False

    def _reduce_after_backward(self) -> None:
        params = [p for p in reversed(list(self.module.parameters())) if p.grad is not None]
        buckets = [_Bucket(b) for b in plan_buckets(params, self.bucket_bytes)]
        for b in buckets:
            self._launch(b)
        self._complete(buckets)


def _trainable_groups(mults: tuple[float, ...]) -> frozenset[int]:
    return frozenset(i for i, m in enumerate(mults) if m != 0)


def _remove_hooks(handles: list) -> None:
    for h in handles:
        h.remove()
    handles.clear()


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


def rank_and_size() -> tuple[int, int]:
    """(rank, world size) of the process group, (0, 1) without one."""
    if not dist.is_initialized():
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def collective_device() -> torch.device:
    """Where a small host value must go for a collective: NCCL (the process group on GPUs) moves CUDA tensors only."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def sum_across_ranks(values: list[int]) -> list[int]:
    """Integers summed over all ranks, exactly (int64)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return values
    return summed(values, torch.int64)


def mean_across_ranks(value: float) -> float:
    """The mean of a scalar over all ranks (the value itself on one process)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    return summed([float(value)], torch.float64)[0] / dist.get_world_size()


def summed(values: list, dtype: torch.dtype) -> list:
    """Host values summed over the process group's ranks, through the device its backend moves
    (:func:`collective_device`)."""
    t = torch.tensor(values, dtype=dtype, device=collective_device())
    dist.all_reduce(t)
    return t.cpu().tolist()


def teardown(failed: bool = False) -> None:
    """Leave the process group this module created (one that Ray Train set up is Ray's to destroy), and put back the
    launcher variables a one-process group set. ``failed``: a run stopped by an error on this rank alone, so no
    barrier (the other ranks may never reach it), and only a one-process group is left (a launcher's process ends)."""
    if not dist.is_initialized():
        _forget_own_group()  # a group of ours that went before this (destroyed by someone else) leaves nothing
        return
    if failed and not (_OWN_GROUP and dist.get_world_size() == 1):
        return
    if not failed:
        dist.barrier()
    if _OWN_GROUP:
        try:
            # DeepSpeed, when it ran here, keeps references to the group: its own destroy releases them, or the next
            # engine in this process (the bench's next cell) would use the destroyed group
            ds_comm = sys.modules.get("deepspeed.comm")
            if ds_comm is not None and ds_comm.is_initialized():
                ds_comm.destroy_process_group()
            else:
                dist.destroy_process_group()
        finally:
            _forget_own_group()


def _forget_own_group() -> None:
    """No group of this module's any more: put back the launcher variables :func:`init_distributed` set for a
    one-process group."""
    global _OWN_GROUP
    _OWN_GROUP = False
    for k, v in _ENV_BEFORE.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    _ENV_BEFORE.clear()
