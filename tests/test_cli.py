import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from pst_dist.io import is_our_png
from pst_dist.metrics import describe_machine, machine_facts

from .conftest import MARKER_TEXT, TINY, place_marker, run_cli_in_process


def run_cli(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "pst_dist.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_demo_prints_table_and_plot(tmp_path):
    out = run_cli("demo", "--out", str(tmp_path), *TINY, "--train.epochs=1", "--log.tensorboard=false",
                  "--train.device=cpu")
    assert out.returncode == 0, out.stderr[-2000:]
    for label in ("clean_standard", "poisoned_standard", "poisoned_pst"):
        assert f"| {label} | 1 |" in out.stdout
    assert f"Computed on: {describe_machine(machine_facts())} (3 runs)." in out.stdout  # the kernels that made it
    assert (tmp_path / "results.md").is_file() and (tmp_path / "test_accuracy.png").stat().st_size > 1000
    again = run_cli("report", str(tmp_path), "--plot", str(tmp_path / "again.png"))
    assert again.returncode == 0 and "poisoned_pst" in again.stdout
    plot = tmp_path / "again.png"
    first = plot.stat().st_ino
    assert run_cli_in_process("report", str(tmp_path), "--plot", str(plot)).returncode == 0  # its own: replaced
    assert plot.stat().st_ino != first and is_our_png(plot)  # (atomically: a new file renamed over it)
    upper = tmp_path / "AGAIN.PNG"  # the suffix in capitals: marked as pst-dist's too, so replaced again
    inodes = []
    for _ in range(2):
        r = run_cli_in_process("report", str(tmp_path), "--plot", str(upper))
        assert r.returncode == 0, r.stderr[-2000:]
        assert is_our_png(upper)
        inodes.append(upper.stat().st_ino)
    assert inodes[0] != inodes[1], "the second report did not replace the first's plot"
    other = tmp_path / "other.png"  # a PNG another program wrote
    Image.new("L", (4, 4)).save(other)
    figure = tmp_path / "figure.png"  # the user's own matplotlib figure (was replaced: any matplotlib PNG passed)
    import matplotlib.pyplot as plt  # the user's side of the test

    plt.figure().savefig(figure)
    plt.close("all")
    theirs, other_bytes, figure_bytes = place_marker(tmp_path / "mine"), other.read_bytes(), figure.read_bytes()
    for bad, message in ((theirs, "name a .png file"), (other, "exists and is not a plot pst-dist wrote"),
                         (figure, "exists and is not a plot pst-dist wrote"), (tmp_path / "curves.txt", "name a .png"),
                         (tmp_path / "nodir" / "c.png", "nodir is not a directory")):
        r = run_cli_in_process("report", str(tmp_path), "--plot", str(bad))
        assert r.returncode == 2 and message in r.stderr and not r.stdout, r.stderr[-2000:]
    assert theirs.read_text() == MARKER_TEXT and other.read_bytes() == other_bytes
    assert figure.read_bytes() == figure_bytes and not (tmp_path / "nodir").exists()
    assert not (tmp_path / "curves.txt").exists()
    r = run_cli_in_process("report", str(tmp_path), "--plot", str(plot), "extra")  # was: exit 0, no plot made
    assert r.returncode == 2 and "unexpected argument 'extra'" in r.stderr, r.stderr[-2000:]
    r = run_cli_in_process("train", *TINY, f"--log.run_dir={tmp_path / 'typo'}", "--resum")  # was taken for --resume
    assert r.returncode == 2 and "unexpected argument '--resum'" in r.stderr, r.stderr[-2000:]
    runs = tmp_path / "foreign"  # a summary.json that is not a run's: one line naming the file and the key
    (runs / "x_seed0").mkdir(parents=True)
    (runs / "x_seed0" / "summary.json").write_text('{"final_test_acc": 0.5}')
    r = run_cli_in_process("report", str(runs))
    assert r.returncode == 2 and f"{runs / 'x_seed0' / 'summary.json'}: no peak_test_acc" in r.stderr, r.stderr
    one = tmp_path / "clean_standard_seed0"  # a run itself, and a path that is not there: each said as such
    r = run_cli_in_process("report", str(one))
    assert r.returncode == 2 and f"{one} is itself a run (it holds summary.json)" in r.stderr, r.stderr
    r = run_cli_in_process("report", str(tmp_path / "nothere"))
    assert r.returncode == 2 and "nothere: no such directory" in r.stderr, r.stderr
    (runs / "x_seed0" / "summary.json").write_text(
        '{"final_test_acc": "high", "peak_test_acc": 1, "test_acc_at_best_val": 1, "final_val_acc": 1}')
    r = run_cli_in_process("report", str(runs))
    assert r.returncode == 2 and "final_test_acc='high'" in r.stderr, r.stderr
    (runs / "x_seed0" / "summary.json").write_text(
        '{"final_test_acc": 1, "peak_test_acc": 1, "test_acc_at_best_val": null, "final_val_acc": 1}')
    r = run_cli_in_process("report", str(runs))
    assert r.returncode == 2 and "test_acc_at_best_val=None" in r.stderr, r.stderr
    (runs / "x_seed0" / "summary.json").write_text(
        '{"final_test_acc": 1, "peak_test_acc": 1, "test_acc_at_best_val": 1, "final_val_acc": 1}')
    assert run_cli_in_process("report", str(runs)).returncode == 0  # the table needs no curve
    r = run_cli_in_process("report", str(runs), "--plot", str(tmp_path / "c.png"))
    assert r.returncode == 2 and "test_curve=None: --plot needs" in r.stderr and not (tmp_path / "c.png").exists()
    # a demo into a folder holding the user's own results.md (no demo run beside it) is refused before training
    user = tmp_path / "user"
    user.mkdir()
    (user / "results.md").write_text("my results\n")
    r = run_cli_in_process("demo", "--out", str(user), *TINY, "--train.epochs=1", "--train.device=cpu")
    assert r.returncode == 2 and "holds results.md, which the demo writes" in r.stderr, r.stderr[-2000:]
    assert sorted(p.name for p in user.iterdir()) == ["results.md"]


def test_train_bad_inputs_exit_nonzero(tmp_path):
    """Refusals before anything is written and before any thread or process starts: the CLI in this process
    (conftest.run_cli_in_process)."""
    out = run_cli_in_process("train", *TINY, "--data.source=fashion-mnist", f"--data.root={tmp_path / 'nope'}",
                             f"--log.run_dir={tmp_path / 'r'}")
    assert out.returncode == 2 and "not found" in out.stderr and "Traceback" not in out.stderr
    out = run_cli_in_process("train", *TINY, '--schedule.stages=[{name="x",freeze=[9]}]',
                             f"--log.run_dir={tmp_path / 'r'}")
    assert out.returncode == 2 and "group 9" in out.stderr
    assert not (tmp_path / "r").exists(), "a rejected run must leave nothing behind"
    out = run_cli_in_process("train", *TINY, "--resume", f"--log.run_dir={tmp_path / 'r2'}")
    assert out.returncode == 2 and "no checkpoint" in out.stderr
    for kind in ("classwise_noise", "samplewise_noise"):  # found once the data is read: still one line, exit 2
        out = run_cli_in_process("poison", *TINY, f"--poison.kind={kind}", "--poison.eps=0.001", "--out",
                                 str(tmp_path / "p"))
        assert out.returncode == 2 and "poison.eps=0.001 is below one pixel level" in out.stderr, out.stderr[-2000:]
        assert "Traceback" not in out.stderr and not (tmp_path / "p").exists()


@pytest.mark.slow
def test_vit_recipe_runs(tmp_path):
    out = run_cli("train", "--config", "launch/configs/vit_tiny_synthetic.toml", "--data.synthetic_train=500",
                  "--train.epochs=2", f"--log.run_dir={tmp_path}", "--log.progress=false")
    assert out.returncode == 0, out.stderr[-2000:]
    assert '"final_test_acc"' in out.stdout


def _expected_keys(cls, prefix: str = "") -> dict:
    """{dotted key: (field, class)} for every field under dataclass ``cls``, walked here independently of config_keys
    (a table field, or a list of tables, listed and then entered)."""
    import dataclasses
    import typing

    out = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = prefix + f.name
        tp = hints[f.name]
        inner = [t for t in (tp, *typing.get_args(tp)) if dataclasses.is_dataclass(t)]
        if prefix or cls.__name__ != "Config":
            out[key] = (f, cls)
        if inner:
            out.update(_expected_keys(inner[0], key + ("[]." if typing.get_origin(tp) is list else ".")))
    return out


def test_keys_lists_every_field_with_type_default_and_doc(capsys):
    """`pst-dist keys`: every field of every section (and of stages, triggers, losses) with its annotation, its
    default and a docstring; a key added without a docstring fails here."""
    import dataclasses

    from pst_dist.cli import main
    from pst_dist.config import Config, tomllib
    from pst_dist.registry import ATTACKS

    assert main(["keys"]) == 0
    blocks = capsys.readouterr().out.split("\n\n")
    printed = {}
    for b in blocks:
        head, _, doc = b.strip("\n").partition("\n")
        if head.startswith("[") or ": " not in head:
            continue
        key, _, rest = head.partition(": ")
        tp, _, default = rest.partition(" = ")
        printed[key] = (tp, default, doc)
    expected = _expected_keys(Config)
    assert set(printed) == set(expected), set(printed) ^ set(expected)
    for key, (f, cls) in expected.items():
        tp, default, doc = printed[key]
        assert tp == str(f.type), key
        assert doc.startswith("    ") and doc.strip(), f"{cls.__name__}.{f.name} ({key}) has no docstring"
        value = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if value is not None and not dataclasses.is_dataclass(value) and \
                not (isinstance(value, list) and value and dataclasses.is_dataclass(value[0])):
            assert tomllib.loads(f"v = {default}")["v"] == value, key
    assert main(["keys", "log"]) == 0
    out = capsys.readouterr().out
    assert "log.trackers: list[str] = []" in out and "data.source" not in out
    assert main(["keys", "poison.kind"]) == 0  # poison.kind's docstring says `pst-dist keys` lists the attacks
    out = capsys.readouterr().out
    assert all(f"      {name}: {e.doc}\n" in out for name, e in ATTACKS.items())
    assert main(["keys", "nope"]) == 2
    assert "nope" in capsys.readouterr().err
    assert "pst-dist keys" in run_cli("train", "--help").stdout


def test_sigterm_during_a_handled_error_is_sent_again_not_lost_and_a_forked_child_still_dies_of_it():
    """Inside an except block SIGTERM waits (the cleanup of an error is not cut short) and comes back half a
    second later, once outside it; a process forked while the handler is set dies of SIGTERM as before (its
    parent's terminate() would otherwise be an exception the child could ignore)."""
    import multiprocessing
    import os
    import signal
    import time

    import pytest

    from pst_dist.cli import Terminated, sigterm_as_interrupt

    before = signal.getsignal(signal.SIGTERM)
    reached = []
    with pytest.raises(Terminated), sigterm_as_interrupt():
        try:
            raise ValueError("an error being handled")
        except ValueError:
            sent = time.monotonic()
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.2)
            reached.append("the end of the except block")  # still here: held while the error is handled
        held = time.monotonic()
        while time.monotonic() - held < 5:
            time.sleep(0.05)
        raise AssertionError("the held SIGTERM never came back")
    came_back = time.monotonic() - sent
    assert reached == ["the end of the except block"], "SIGTERM cut the handling of the error short"
    assert 0.4 < came_back < 4, f"the held SIGTERM came back {came_back:.2f} s after it was sent (0.5 s expected)"
    assert signal.getsignal(signal.SIGTERM) == before
    with sigterm_as_interrupt():
        child = multiprocessing.get_context("fork").Process(target=time.sleep, args=(60,))
        child.start()
        time.sleep(0.5)  # running (a signal in the microseconds before the fork hook ran would be lost)
        child.terminate()
        child.join(10)
    assert child.exitcode == -signal.SIGTERM


def test_a_reader_closing_stdout_ends_a_printing_command_quietly():
    # `pst-dist keys | head` printed "error: Broken pipe ... nothing half-written was left" and exited 1
    import fcntl
    import subprocess
    import sys

    p = subprocess.Popen([sys.executable, "-m", "pst_dist.cli", "keys"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    fcntl.fcntl(p.stdout.fileno(), 1031, 4096)  # F_SETPIPE_SZ: the 32 kB it prints cannot all wait in the pipe
    p.stdout.readline()
    p.stdout.close()  # as head does after its lines
    err = p.stderr.read().decode()
    assert p.wait(timeout=60) == 141 and err == "", err


@pytest.mark.parametrize("seeds", ["0", "-2"])
def test_demo_refuses_fewer_than_one_seed_before_writing_anything(tmp_path, seeds):
    """Was: exit 0 with an empty table and plot in an existing --out, or an error naming a hidden temp file."""
    kept, new = tmp_path / "kept", tmp_path / "new"
    kept.mkdir()
    for out in (kept, new):
        r = run_cli_in_process("demo", "--out", str(out), "--seeds", seeds, *TINY)
        assert r.returncode == 2 and f"--seeds {seeds}: expected an integer >= 1" in r.stderr, r.stderr[-2000:]
    assert not any(kept.iterdir()) and not new.exists()


def test_outputs_into_a_directory_it_cannot_write_are_refused_before_the_work(tmp_path):
    """export, eval --out and report --plot into a read-only directory: one line naming the option and the
    directory, before the checkpoint is read (was: exit 1 after the work, naming a hidden temp file). Run as a user
    without root's bypass of permissions (nobody, through setpriv, when the tests run as root)."""
    import os
    import shutil
    import tempfile

    if os.geteuid() == 0 and not shutil.which("setpriv"):
        pytest.skip("needs setpriv to run as a user that file permissions apply to")
    as_user = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"] if os.geteuid() == 0 else []
    base = Path(tempfile.mkdtemp(prefix="pst-readonly-"))  # tmp_path's parents are root's alone
    try:
        base.chmod(0o755)
        run = base / "run"
        made = run_cli("train", *TINY, "--train.epochs=1", "--train.threads=1", f"--log.run_dir={run}")
        assert made.returncode == 0, made.stderr[-2000:]
        (base / "home").mkdir()
        ro = base / "ro"
        ro.mkdir()
        for p in [base, *base.rglob("*")]:
            p.chmod(0o777 if p.name == "home" else 0o555 if p == ro else (0o755 if p.is_dir() else 0o644))
        # its own temp dir too: torch makes a cache folder in it at import, and /tmp's would be nobody's, left there
        env = {"PATH": os.environ["PATH"], "HOME": str(base / "home"), "TMPDIR": str(base / "home"),
               "OMP_NUM_THREADS": "1"}
        for cmd, named in ((["export", "--run", str(run), "--out", str(ro / "e")], f"--out {ro / 'e'}"),
                           (["eval", "--run", str(run), "--out", str(ro / "e.json")], f"--out {ro / 'e.json'}"),
                           (["report", str(base), "--plot", str(ro / "c.png")], f"--plot {ro / 'c.png'}")):
            r = subprocess.run([*as_user, sys.executable, "-m", "pst_dist.cli", *cmd], capture_output=True, text=True,
                               timeout=300, env=env, cwd=base)
            assert r.returncode == 2 and named in r.stderr and "not writable" in r.stderr, (cmd, r.stderr[-2000:])
            assert not r.stdout and len(r.stderr.strip().splitlines()) == 1, (cmd, r.stdout, r.stderr)
        assert not any(ro.iterdir())
    finally:
        for p in [base, *base.rglob("*")]:
            p.chmod(0o755)
        shutil.rmtree(base)


@pytest.mark.parametrize("text,lost", [
    ("[/x/gloo/transport/tcp/pair.cc:545] Read error [127.0.0.1]:61663: Connection reset by peer. This is typically",
     "Read error [127.0.0.1]:61663: Connection reset by peer"),
    ("[/x/gloo/transport/tcp/pair.cc:598] Connection closed by peer [10.0.0.2]:1234", "Connection closed by peer "
     "[10.0.0.2]:1234"),
    ("NCCL error in: x.cpp:1, remote process exited or there was a network error, NCCL version 2.21.5",
     "NCCL error in: x.cpp:1, remote process exited or there was a network error, NCCL version 2.21.5"),
    ("NCCL error in: x.cpp:1, unhandled cuda error: CUDA out of memory", None),  # a bug or a limit: traceback
    ("Tensors must be CUDA and dense", None),
    ("Gloo does not support this device", None),
])
def test_only_a_peer_that_went_away_is_said_as_such(monkeypatch, text, lost):
    from pst_dist.cli import peer_lost

    monkeypatch.setenv("WORLD_SIZE", "2")
    assert peer_lost(RuntimeError(text)) == lost
    monkeypatch.setenv("WORLD_SIZE", "1")  # one rank: no peer to lose
    assert peer_lost(RuntimeError(text)) is None


WATCHED = """
import os, signal, sys, time
from pst_dist.cli import _ends_when_stuck
signal.signal(signal.SIGTERM, lambda *_: None)  # a handler that returns: only the watch can end the process
with _ends_when_stuck(0.5, taken=lambda: sys.argv[1] == "taken"):  # "stuck": as if the handler never ran
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(2)
print("ended by itself")
"""


@pytest.mark.parametrize("case", ["stuck", "taken"])
def test_the_sigterm_watch_ends_only_a_process_whose_handler_did_not_run(case):
    """The watch exits 143 after its grace when the SIGTERM handler has not run (the main thread stuck in C); once
    it has run, the command's own cleanup is not cut short."""
    r = subprocess.run([sys.executable, "-c", WATCHED, case], capture_output=True, text=True, timeout=60)
    if case == "stuck":
        assert r.returncode == 143 and "still inside a call that does not return" in r.stderr, r.stderr
    else:
        assert r.returncode == 0 and r.stdout.strip() == "ended by itself", r.stderr
