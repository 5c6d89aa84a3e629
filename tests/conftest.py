import atexit
import contextlib
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path

import pytest
import torch

os.environ.setdefault("OMP_NUM_THREADS", "2")
# torch makes its compile cache folder, <temp dir>/torchinductor_<user>, as soon as a test module imports timm (at
# collection, before _session_temp sets TMPDIR): one of this process's own instead, removed at its exit, not one left
# in the machine's temp dir (a cache the caller names is theirs)
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="pst-inductor-")
    atexit.register(shutil.rmtree, os.environ["TORCHINDUCTOR_CACHE_DIR"], True)


@pytest.fixture(scope="session", autouse=True)
def _torch_extensions(tmp_path_factory):
    """One JIT-build cache for the session's own processes (DeepSpeed builds its shared-memory comm op on the CPU,
    ~45 s): in the session's temp dir (or the ``TORCH_EXTENSIONS_DIR`` the caller set), not under anybody's HOME, and
    handed to every process the tests start, so a test with a HOME of its own (a Ray test's) reuses the build instead
    of redoing it. The venv's bin comes first on PATH, as the Ray tests' processes have it: torch builds with the first
    ``ninja`` on PATH, and a build recorded by another ninja (the venv's 1.13 against Debian's 1.11) is redone. Under
    pytest-xdist (``make test``: ``-n``) the workers share one cache, in the run's base temp dir above their own:
    torch builds under a lock file there, so one worker builds and the others wait for it and load the build."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):  # a worker's base temp dir is <the run's>/popen-gwN
        base = base.parent
    with pytest.MonkeyPatch.context() as mp:
        # a cache the caller names explicitly is theirs to share; otherwise the session's own
        mp.setenv("TORCH_EXTENSIONS_DIR", os.environ.get("TORCH_EXTENSIONS_DIR") or str(base / "torch_extensions"))
        mp.setenv("PATH", str(Path(sys.executable).parent), prepend=os.pathsep)
        yield


@pytest.fixture(scope="session", autouse=True)
def _session_temp(tmp_path_factory):
    """One temp dir (TMPDIR) for everything the session and the processes it starts make there, removed at the
    session's end: what a process a test kills cannot remove at its exit (multiprocessing's listener folders, wandb's
    temporary folders) goes with it instead of staying in the machine's temp dir. pytest's own tmp_path folders stay
    where pytest keeps them (its basetemp, fixed first). Short, as Ray's socket paths must be; readable by others (a
    test runs commands as another user)."""
    tmp_path_factory.getbasetemp()
    temp = Path(tempfile.mkdtemp(prefix="pst-tests-"))
    temp.chmod(0o755)
    before = tempfile.tempdir
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TMPDIR", str(temp))
        tempfile.tempdir = str(temp)
        try:
            yield temp
        finally:
            tempfile.tempdir = before
            shutil.rmtree(temp, ignore_errors=True)


def _sigterm_as_ctrl_c(signum, frame) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # once: a second SIGTERM ends the session at once
    raise KeyboardInterrupt(f"signal {signum} (SIGTERM)")


def _default_sigterm_in_child() -> None:  # a forked child (a DataLoader worker) is ended by SIGTERM, as before
    if signal.getsignal(signal.SIGTERM) is _sigterm_as_ctrl_c:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


os.register_at_fork(after_in_child=_default_sigterm_in_child)


@pytest.fixture(scope="session", autouse=True)
def _sigterm_runs_teardowns():
    """A session ended by SIGTERM (a CI job's time limit, `kill`) stops as after Ctrl-C, running its fixtures'
    teardowns: without it Python dies at once, and what the tests started (a test's own local Ray cluster, its
    processes and temp dirs) outlives them."""
    before = signal.signal(signal.SIGTERM, _sigterm_as_ctrl_c)
    try:
        yield
    finally:
        if signal.getsignal(signal.SIGTERM) is _sigterm_as_ctrl_c:
            signal.signal(signal.SIGTERM, before)


def child_env(**extra: str) -> dict[str, str]:
    """The small environment the tests' launchers and ranks run in: one thread, the system's PATH, this repository
    on PYTHONPATH and the session's temp dir (:func:`_session_temp`); ``extra`` added or replacing."""
    return {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(Path(__file__).parent.parent),
            "TMPDIR": tempfile.gettempdir(), **extra}


def deepspeed_env() -> dict[str, str]:
    """:func:`child_env` for DeepSpeed's ranks: the session's PATH (the venv's ninja first) and JIT-build cache
    (:func:`_torch_extensions`), and HOME."""
    return child_env(PATH=os.environ.get("PATH", "/usr/bin:/bin"), HOME=os.environ.get("HOME", "/tmp"),
                     TORCH_EXTENSIONS_DIR=os.environ["TORCH_EXTENSIONS_DIR"])


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def quadrant_images(n: int, chans: int, seed: int, low: int, high: int):
    """``n`` uint8 images (16 x 16) of 4 classes whose class shows as a bright quadrant, so that a tiny surrogate or
    model learns them in a few steps; pixels uniform in [low, high) plus 60 in the class's quadrant."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 4
    x = torch.randint(low, high, (n, chans, 16, 16), generator=g, dtype=torch.uint8)
    for c in range(4):
        r, q = divmod(c, 2)
        x[y == c, :, 8 * r: 8 * r + 8, 8 * q: 8 * q + 8] += 60
    return x, y


TINY = ["--data.source=synthetic", "--data.synthetic_train=256", "--data.val_size=64", "--data.img_size=16",
        "--data.probe_size=64", "--model.width=0.125", "--train.batch_size=32", "--train.epochs=2",
        "--log.progress=false"]


# ---------------------------------------------------------------------------------------------------------------
# bad-input tests: a refused command exits non-zero, names the bad value, keeps what the user had, leaves no partial

MARKER_TEXT = "a file of the user's: pst-dist must never delete or change it\n"
PARTIAL = (".partial-", ".tmp", ".old-")


def place_marker(directory) -> Path:
    """A user's file beside (or inside) an output location; :func:`assert_refused` checks that it survives."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    marker = directory / "USER_FILE.txt"
    marker.write_text(MARKER_TEXT)
    return marker


def partial_files(root) -> list[str]:
    """Hidden temporary / partial / set-aside names pst-dist uses while writing, anywhere under ``root``."""
    return sorted(str(p) for p in Path(root).rglob("*") if any(t in p.name for t in PARTIAL))


def run_cli(*args, timeout=600, env=None, cwd=None):
    """``python -m pst_dist.cli ARGS`` in a subprocess; returns the CompletedProcess (text)."""
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "pst_dist.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=cwd)


def signal_after_checkpoint(args, run_dir: Path, sig: int, **popen):
    """``pst-dist train ARGS`` in a subprocess, sent ``sig`` once its first checkpoint is in ``run_dir``; the
    CompletedProcess (the test asserts it checkpointed: a run that ends first has no checkpoint to keep)."""
    import subprocess
    import time

    proc = subprocess.Popen([sys.executable, "-m", "pst_dist.cli", "train", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **popen)
    deadline = time.time() + 240
    while not (run_dir / "checkpoint.pt").is_file() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert (run_dir / "checkpoint.pt").is_file(), "training never checkpointed"
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def run_cli_in_process(*args, timeout=300):
    """``pst_dist.cli.main(ARGS)`` in this process, for commands that refuse their input before any work: the CLI's
    own parsing, checks, messages and exit code without a Python and torch start-up (~4 s) per case. Returns a
    CompletedProcess like :func:`run_cli` (an exception that escapes ``main`` becomes exit 1 with its traceback on
    stderr, as the interpreter would print it). No launcher variables may be set (a one-rank run is what refuses);
    a call that hangs past ``timeout`` ends the test session with every thread's traceback instead of hanging CI.
    The call runs as on a machine without a GPU (``torch.cuda.is_available()`` is False during it: a CUDA context
    made in this process could not be undone). The environment, Python's and torch's random state, torch's thread
    count, its deterministic mode and cuDNN's benchmark flag are restored afterwards."""
    import contextlib
    import faulthandler
    import io
    import random
    import subprocess
    import traceback
    from unittest import mock

    from pst_dist.cli import main

    launcher = sorted(k for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR") if k in os.environ)
    assert not launcher, f"run_cli_in_process under a launcher's variables {launcher}: use run_cli"
    out, err = io.StringIO(), io.StringIO()
    threads, py_rng, rng = torch.get_num_threads(), random.getstate(), torch.get_rng_state()
    det, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    benchmark = torch.backends.cudnn.benchmark
    faulthandler.dump_traceback_later(timeout, exit=True)
    try:
        with mock.patch.dict(os.environ), mock.patch("torch.cuda.is_available", return_value=False), \
                contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main([str(a) for a in args])
            except SystemExit as e:  # argparse's own refusals
                code = e.code if isinstance(e.code, int) else int(e.code is not None)
            except Exception:  # noqa: BLE001 - reported as the interpreter would, for the caller's assertions
                traceback.print_exc()
                code = 1
    finally:
        faulthandler.cancel_dump_traceback_later()
        random.setstate(py_rng)
        torch.set_rng_state(rng)
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(det, warn_only=warn_only)
        torch.backends.cudnn.benchmark = benchmark
    if code == 143 and "terminated (SIGTERM)" in err.getvalue():  # the command's own handler took the session's:
        raise KeyboardInterrupt("SIGTERM during an in-process command")  # the session stops (_sigterm_runs_teardowns)
    return subprocess.CompletedProcess(["pst-dist", *map(str, args)], code, out.getvalue(), err.getvalue())


def assert_refused(out, names, markers=(), root=None, code=None) -> None:
    """``out`` (a CompletedProcess) failed cleanly: non-zero exit (``code`` if given), a ``pst-dist:`` line (an error,
    or an interruption) naming each of ``names``, no traceback; each marker file intact; no partial files under
    ``root``."""
    assert out.returncode != 0, f"exit 0; stdout: {out.stdout[-1500:]}"
    if code is not None:
        assert out.returncode == code, (out.returncode, out.stderr[-2000:])
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    assert "pst-dist: " in out.stderr, out.stderr[-2000:]
    said = out.stderr[out.stderr.index("pst-dist: "):]  # the error itself, not what was printed before it
    for n in [names] if isinstance(names, str) else names:
        assert n in said, f"{n!r} not named in the error: {said[-2000:]}"
    for m in markers:
        assert m.is_file() and m.read_text() == MARKER_TEXT, f"{m} was changed or removed"
    if root is not None:
        assert not partial_files(root), partial_files(root)


def children_of(pid: int) -> list[int]:
    """The live processes whose parent is ``pid`` (Linux /proc; [] elsewhere)."""
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            kids.append(int(stat.parent.name))
    return kids


def alive(pid: int) -> bool:
    """Whether ``pid`` is a live process (not a zombie)."""
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def cmdline(pid: int) -> str | None:
    """``pid``'s command line (its arguments joined by NULs), None when there is no such process."""
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return None


def kill_if_ours(pid: int, marker: str) -> None:
    """SIGKILL ``pid`` when it is still the process a test started: alive, and ``marker`` in its command line (a pid
    seen earlier may belong to another process by now)."""
    if alive(pid) and marker in (cmdline(pid) or ""):
        os.kill(pid, signal.SIGKILL)


def workers_of(pid: int) -> list[int]:
    """The live child processes of ``pid`` but multiprocessing's resource tracker (a pool's or writer's processes)."""
    return [k for k in children_of(pid) if (line := cmdline(k)) is not None and "resource_tracker" not in line]


def outliving(pids: list[int], seconds: float = 30) -> list[int]:
    """Those of ``pids`` still alive ``seconds`` from now (returns as soon as none is)."""
    import time

    deadline = time.time() + seconds
    while time.time() < deadline and any(alive(p) for p in pids):
        time.sleep(0.2)
    return [p for p in pids if alive(p)]


@contextlib.contextmanager
def started(cmd: list, marker: str, **popen):
    """``cmd`` started (stdout and stderr to /dev/null); yields (the process, a list to put its children's pids
    in). At the end the process and, of those pids, the ones still its own (``marker`` in their command line:
    :func:`kill_if_ours`) are killed: what the test started, and only that, ends with it."""
    import subprocess

    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **popen)
    kids: list[int] = []
    try:
        yield proc, kids
    finally:
        proc.kill()
        proc.wait()
        for k in kids:
            kill_if_ours(k, marker)


def dead_pid() -> int:
    """The process id of a process that has ended (one started and waited for here)."""
    import subprocess

    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


@contextlib.contextmanager
def lock_held_elsewhere(lock: Path):
    """Another process holds ``lock`` (a run directory's :data:`pst_dist.rundir.LOCK`) under flock, its file naming
    process 4242 on machine elsewhere+1, until the block ends (then it exits and the kernel lets the lock go)."""
    import subprocess

    holder = subprocess.Popen([sys.executable, "-c", f"""
import fcntl, json, os, sys
fd = os.open({str(lock)!r}, os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
os.write(fd, json.dumps({{"machine": "elsewhere+1", "pid": 4242, "since": "then"}}).encode())
print("held", flush=True)
sys.stdin.read()
"""], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        yield
    finally:
        holder.stdin.close()
        holder.wait(30)
