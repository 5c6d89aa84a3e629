"""One metrics path: rank 0 writes namespaced scalars (train/loss, eval/test_acc, pst/stage, ...) to TensorBoard, to
metrics.jsonl and to the trackers ``log.trackers`` names (:mod:`pst_dist.tracking`); the run directory also holds
the resolved config, git SHA and library versions."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy
import timm
import torch
import torchvision

from .io import OutputError, read_json, reported
from .rundir import keep_metrics_until, meta_segments


def tensorboard_writer(logdir: Path, **kwargs):
    """torch's TensorBoard SummaryWriter for ``logdir``. Its writer thread's OSError (a full disk) is not printed as a
    thread's traceback: TensorBoard raises it again in the caller's thread at the next write, flush or close, where
    the command reports it (:func:`tb_errors`). The hook is the process's, installed once, for any TensorBoard
    thread; every other thread's error goes to the hook that was there before."""
    from torch.utils.tensorboard import SummaryWriter  # tensorboard: start-up time, only when enabled

    if not getattr(threading.excepthook, "quiet_tensorboard", False):
        before = threading.excepthook

        def hook(args) -> None:
            if not (issubclass(args.exc_type, OSError) and type(args.thread).__module__.startswith("tensorboard.")):
                before(args)

        hook.quiet_tensorboard = True
        threading.excepthook = hook
    return SummaryWriter(str(logdir), **kwargs)


@contextlib.contextmanager
def tb_errors(tb) -> Iterator[None]:
    """A TensorBoard writer ``tb``'s OSError (from its writer thread: a full disk) names the writer's folder (a
    write's error names no file)."""
    try:
        yield
    except OSError as e:
        raise OSError(e.errno, e.strerror, e.filename or tb.get_logdir()) from None


def git_sha() -> str:
    try:
        here = Path(__file__).resolve().parent
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def library_versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
           "timm": timm.__version__, "numpy": numpy.__version__}
    for mod in ("deepspeed", "ray", "ffcv"):
        if mod in sys.modules:
            out[mod] = getattr(sys.modules[mod], "__version__", "?")
    return out


KERNEL_ENV = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "ONEDNN_DEFAULT_FPMATH_MODE",
              "DNNL_DEFAULT_FPMATH_MODE", "MKL_ENABLE_INSTRUCTIONS", "MKL_CBWR", "CUBLAS_WORKSPACE_CONFIG",
              "NVIDIA_TF32_OVERRIDE", "TORCH_ALLOW_TF32_CUBLAS_OVERRIDE")
"""Environment variables that choose which float kernels run, or at what precision."""


def machine_facts(device: torch.device | None = None) -> dict:
    """This process's kernel choice: the CPU, the vector instructions torch dispatches to (``AVX512``, ``AVX2``, ...),
    the GPU of ``device``, and the :data:`KERNEL_ENV` variables set. Other kernels round otherwise, and a run then
    lands elsewhere as another seed would (docs/results/pst_one_recipe.md, section 29)."""
    out: dict = {"cpu": _cpu_model(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                 "env": {k: os.environ[k] for k in KERNEL_ENV if k in os.environ}}
    if device is not None and device.type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(device)
    return out


NOT_RECORDED = "machine not recorded"
"""What :func:`describe_machine` says of a run from before ``machine`` was recorded, or of an unreadable record."""


def describe_machine(m: dict | None) -> str:
    """One line for a :func:`machine_facts` record: the CPU, its capability, the GPU and the kernel variables set."""
    if not isinstance(m, dict):
        return NOT_RECORDED
    env = m.get("env") if isinstance(m.get("env"), dict) else {}
    parts = [str(m.get("cpu") or "unknown CPU"), str(m.get("cpu_capability") or "unknown capability"),
             *([str(m["gpu"])] if m.get("gpu") else []), *(f"{k}={v}" for k, v in sorted(env.items()))]
    return ", ".join(parts)


def run_machines(run_dir: Path) -> set[str]:
    """:func:`describe_machine` of each segment of the run in ``run_dir`` (:data:`NOT_RECORDED` for a missing or
    unreadable meta.json)."""
    try:
        meta = read_json(Path(run_dir) / "meta.json", "the run's meta.json")
    except OutputError:
        meta = {}
    return {describe_machine(m.get("machine")) for m in meta_segments(meta)}


def computed_on(each: dict[str, dict[str, int]]) -> list[str]:
    """Lines for a results table saying which machines computed it; ``each``: {:func:`describe_machine`: {what: how
    many computed there}} ({"cell": 16, "poison": 4}). Other kernels round otherwise and move a result as another seed
    would (docs/results/pst_one_recipe.md, section 29), so a table made on several says so and lists each."""
    counts = {d: ", ".join(f"{n} {what}{'s' if n != 1 else ''}" for what, n in c.items() if n) for d, c in each.items()}
    known = [d for d in sorted(counts) if d != NOT_RECORDED]
    unknown = f"{NOT_RECORDED} (made before pst-dist recorded it, or an unreadable record): {counts[NOT_RECORDED]}" \
        if NOT_RECORDED in counts else ""
    if not known:
        return [unknown.capitalize() + "."] if unknown else []
    if len(known) == 1 and not unknown:
        return [f"Computed on: {known[0]} ({counts[known[0]]})."]
    head = (f"Computed on {len(known)} machines or kernel settings" if len(known) > 1 else "Computed on one machine")
    return ([head + (", some results unrecorded" if unknown else "") + " (a run's meta.json and a poison's "
             "poison.json say which; other kernels round otherwise and move a result as another seed would, so "
             "compare results made on one; a resumed run counts under each machine it ran on):", ""]
            + [f"- {d}: {counts[d]}" for d in known] + ([f"- {unknown}"] if unknown else []))


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _row(values: dict) -> str:
    return json.dumps(values, sort_keys=True)


class Metrics:
    """Rank-0 writer; a no-op on other ranks. ``cfg``: the run's config, whose ``log.trackers`` are opened (and
    given the config once per run; opened first, so a resume they refuse changes no file). ``resumed_at``: the step a
    resume continues from: metrics.jsonl drops its rows after it (:func:`pst_dist.rundir.keep_metrics_until`, keeping
    those logged there); TensorBoard then drops what
    the run's earlier event files hold after it (``purge_step``), the steps this segment logs again. What the earlier
    segments logged at that step itself is kept, so a row this segment logs again there, the same values
    (``pst/stage`` when a stage begins at the checkpoint's epoch boundary), is written nowhere a second time
    (:meth:`flush` before each checkpoint keeps TensorBoard's files as complete as metrics.jsonl); the caller leaves
    out what only a fresh run logs (the sample grid at step 0)."""

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool, cfg=None, resumed_at: int | None = None):
        self.enabled = enabled
        self.tb = None
        self._file = None
        self.trackers: list = []
        self._resumed_at = resumed_at
        self._logged_at_resume: set = set()
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        if cfg is not None and cfg.log.trackers:  # first: a resume they refuse leaves metrics.jsonl and tb/ alone
            from .tracking import open_trackers  # the trackers' packages: start-up time, only when named

            self.trackers = open_trackers(run_dir, cfg)
        try:
            if resumed_at is not None:  # the rows logged after the checkpoint are logged again: dropped
                logged = keep_metrics_until(run_dir, resumed_at)
                self._logged_at_resume = {_row({k: v for k, v in r.items() if k != "step"}) for r in logged}
            self._file = open(run_dir / "metrics.jsonl", "a", encoding="utf-8")
            if tensorboard:
                purge = None if resumed_at is None else resumed_at + 1
                self.tb = tensorboard_writer(run_dir / "tb", purge_step=purge)
        except BaseException:  # no Metrics for the caller to close: the trackers, the file and TensorBoard's here
            self.close(failed=True)
            raise

    def log(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        if step == self._resumed_at and _row(values) in self._logged_at_resume:  # an earlier segment logged it
            return
        try:
            self._file.write(json.dumps({"step": step, **values}) + "\n")
            self._file.flush()
        except OSError as e:  # a full disk: a write's error names no file
            raise OSError(e.errno, e.strerror, self._file.name) from None
        scalars = {k: v for k, v in values.items() if isinstance(v, int | float)}
        if self.tb is not None:
            with tb_errors(self.tb):
                for k, v in scalars.items():
                    self.tb.add_scalar(k, v, step)
        for t in self.trackers:
            t.log(step, scalars)

    def flush(self) -> None:
        """Everything logged so far on disk (TensorBoard's writer otherwise flushes every 2 minutes)."""
        if self.tb is not None:
            with tb_errors(self.tb):
                self.tb.flush()

    def image(self, tag: str, grid: torch.Tensor, step: int = 0) -> None:
        if self.enabled and self.tb is not None:
            with tb_errors(self.tb):
                self.tb.add_image(tag, grid, step)

    def close(self, failed: bool = False) -> None:
        """Close the files, TensorBoard's writer and the trackers' runs (``failed``: marked failed there); once.
        Each is tried in turn even when one before it cannot close (a tracker's server gone): that one is reported
        on stderr and, after a run that did not fail, its error raised once every other has closed."""
        self.enabled = False
        file, tb, trackers = self._file, self.tb, self.trackers
        self._file, self.tb, self.trackers = None, None, []
        closes = [*([file.close] if file else []), *([lambda: close_tensorboard(tb)] if tb is not None else []),
                  *(lambda t=t: t.close(failed) for t in trackers)]
        errors: list[BaseException] = []
        for close in closes:  # the rest still close
            with reported(f"closing the run's metrics{' after its error' * failed}", errors):
                close()
        if errors and (not failed or not isinstance(errors[0], Exception)):  # a Ctrl-C is always raised
            raise errors[0]


def close_tensorboard(tb) -> None:
    """Close a TensorBoard writer; its error (a full disk) names its folder (:func:`tb_errors`)."""
    with tb_errors(tb):
        tb.close()
