"""The Ray Tune schedule search: the search space (pure), and real searches on a real local Ray (no mocks): a
``ray job submit`` of a tiny search to a two-node cluster (``ray start`` of a head and a worker node on this machine)
whose best schedule ``pst-dist train`` runs; slow: searches that survive a Ray Train worker or a whole node killed.

Every test that starts Ray owns all of its state (:class:`OwnRay`): a HOME of its own (nothing is read from or
written to the user's ``~/.ray``), a fresh random token (``RAY_AUTH_TOKEN``), a temp dir of its own (``RAY_TMPDIR``
and ``--temp-dir``), and at teardown it stops the Ray processes it started and no others (never ``ray stop``, which
stops every Ray on the machine)."""

from __future__ import annotations

import csv
import itertools
import json
import math
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from pst_dist.cli import main
from pst_dist.config import ConfigError, load_config
from pst_dist.models import count_groups
from pst_dist.pst.schedule import Schedule
from tune.space import grid_size, schedule_stages, skeletons, valid_orders

from .conftest import MARKER_TEXT, place_marker

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "configs" / "tune_tiny.toml"
BIN = Path(sys.executable).parent


# ---------------------------------------------------------------------------------------------------------------
# the search space


def test_orders_are_permutations_that_never_name_the_head_or_a_missing_group():
    cfg = load_config(TINY, ["--tune.unfreeze_groups=[0, 1, 2]"])
    assert sorted(valid_orders(cfg, num_groups=6)) == sorted(itertools.permutations([0, 1, 2]))
    with pytest.raises(ConfigError, match="group 5: the head"):
        valid_orders(load_config(TINY, ["--tune.unfreeze_groups=[0, 5]"]), 6)
    with pytest.raises(ConfigError, match="group 7: a group the model lacks"):
        valid_orders(load_config(TINY, ["--tune.unfreeze_groups=[0, 7]"]), 6)
    with pytest.raises(ConfigError, match="'0-2' is not a permutation"):  # when the config loads, not at the search
        load_config(TINY, ['--tune.unfreeze_orders=["0-2"]'])
    for bad in ("1,0", "\u00b2-0"):  # (a superscript two is a digit to str.isdigit, not to int)
        with pytest.raises(ConfigError, match=f"'{bad}': expected group indices joined by '-'"):
            load_config(TINY, [f'--tune.unfreeze_orders=["{bad}"]'])
    assert valid_orders(load_config(TINY, ['--tune.unfreeze_orders=["1 - 0"]']), 6) == [(1, 0)]  # as before
    with pytest.raises(ConfigError, match="appears twice"):
        load_config(TINY, ["--tune.unfreeze_groups=[1, 1]"])
    only = load_config(TINY, ['--tune.unfreeze_orders=["1-0"]'])
    assert valid_orders(only, 6) == [(1, 0)]


def test_schedules_that_do_not_fit_in_training_are_never_offered():
    cfg = load_config(TINY, ["--train.epochs=4", "--tune.freeze_epochs=[1.0, 3.0]"])
    offered = skeletons(cfg, 6)  # warm 1 + freeze 3 + release 1 = 5 epochs before the last stage: does not fit in 4
    assert {s.freeze for s in offered} == {1.0} and len(offered) == 2  # two orders
    assert grid_size(cfg, 6) == 2 * 1 * 2 ** 2  # skeletons x thresholds x mults per release stage
    with pytest.raises(ConfigError, match="no schedule fits.*train.epochs=2"):
        skeletons(load_config(TINY, ["--train.epochs=2"]), 6)


def test_a_trial_schedule_releases_groups_in_its_order_at_its_multipliers():
    cfg = load_config(TINY, ["--tune.unfreeze_groups=[0, 1, 2]", "--train.epochs=8"])
    params = {"skeleton": "warm=1,freeze=2,release=1,order=2-0-1", "threshold": 0.3,
              "mult_0": 0.1, "mult_1": 0.5, "mult_2": 1.0}
    stages = schedule_stages(cfg, params)
    assert [s.name for s in stages] == ["warm", "frozen", "release_2", "release_0", "release_1"]
    assert [tuple(s.mults(6)) for s in stages] == [
        (1, 1, 1, 1, 1, 1), (0, 0, 0, 1, 1, 1), (0, 0, 0.1, 1, 1, 1), (0.5, 0, 0.5, 1, 1, 1), (1, 1, 1, 1, 1, 1)]
    assert stages[0].trigger.threshold == 0.3 and stages[0].trigger.view == "quantize"  # from the template
    assert stages[1].reinit_head and stages[-1].epochs == 0  # the last stage runs to the end
    sched = Schedule(stages, 6, steps_per_epoch=10, total_steps=80)
    assert [sched.stage_at(step).index for step in (0, 9, 10, 29, 30, 40, 50, 79)] == [0, 0, 1, 1, 2, 3, 4, 4]


# ---------------------------------------------------------------------------------------------------------------
# Ray state a test owns, and stopping only the Ray processes it started


def test_a_trial_s_line_torn_by_a_kill_is_left_out_of_the_report(tmp_path):
    """A trial killed mid-write and never restored leaves a torn last line in metrics.jsonl and nodes.jsonl: the
    report reads the records before it (it raised JSONDecodeError and no report was written)."""
    from tune.report import _curve, trial_nodes

    (tmp_path / "metrics.jsonl").write_text('{"step": 10, "epoch": 1, "eval/val_acc": 0.5}\n{"step": 12, "loss": 1}\n'
                                            '{"step": 20, "epoch": 2, "eval/val_acc": 0.6}\n{"step": 30, "eval/val')
    (tmp_path / "nodes.jsonl").write_text('{"node_id": "a", "epoch": 1}\n{"node_id": "b", "epo')
    curve, trained = _curve(tmp_path / "metrics.jsonl")
    assert [r["eval/val_acc"] for r in curve] == [0.5, 0.6] and trained == 2
    assert trial_nodes(tmp_path) == ["a"]


def test_equal_objectives_go_to_the_first_trial_or_with_ties_clean_to_the_better_clean_run():
    from tune.report import best_row, results_md

    rows = [{"trial": f"a_0000{i}", "status": status, "final_val_acc": worst, "val_acc_none": clean,
             "final_test_acc": 0.8}
            for i, (status, worst, clean) in enumerate([("completed", 0.835, 0.8525), ("completed", 0.835, 0.859),
                                                        ("completed", 0.830, 0.870), ("stopped", 0.840, 0.880)])]
    assert best_row(rows)["trial"] == "a_00000"  # the first of equals
    assert best_row(rows, "clean")["trial"] == "a_00001"  # the cost on clean data decides
    assert best_row(rows[2:], "clean")["trial"] == "a_00002"  # the objective first; a stopped trial never wins
    assert best_row(rows[3:]) is None
    from tune.report import peak

    assert math.isnan(peak([0.5, math.nan])) and math.isnan(peak([math.nan, 0.5])) and peak([0.5, 0.7]) == 0.7
    nan = {**rows[1], "trial": "a_00004", "val_acc_none": float("nan")}
    assert best_row([nan, rows[0]], "clean")["trial"] == "a_00000"  # a clean run without a figure loses the tie
    cfg = load_config(None, ["--tune.ties=clean", '--tune.attacks=["none", "em"]'])
    md = results_md(cfg, rows, best_row(rows, "clean"), 0)
    assert "among equals, the higher clean validation accuracy (val_acc_none)" in md
    with pytest.raises(ConfigError, match=r"tune.ties='clean' with tune.attacks=\['em'\].*add \"none\""):
        load_config(None, ["--tune.ties=clean", '--tune.attacks=["em"]'])
    with pytest.raises(ConfigError, match=re.escape("tune.ties='best': expected order|clean")):
        load_config(None, ["--tune.ties=best"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _names(temp: str, cmdline: list[str]) -> bool:
    """Whether a command line names ``temp`` (or a path under it) as a whole path, not as a prefix of another."""
    return any(f"{temp}/" in f"{arg}/" for arg in cmdline)


@dataclass
class OwnRay:
    """Everything Ray-related one test starts: an empty HOME, a random token, a short temp dir under /tmp (Ray's
    unix socket paths must stay under ~107 characters), and the process groups of its ``ray start`` runs."""

    home: Path
    temp: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="pst-ray-", dir="/tmp")))
    token: str = field(default_factory=lambda: secrets.token_hex(32))  # as ``ray get-auth-token --generate`` makes
    pgids: list[int] = field(default_factory=list)
    node_temps: list[Path] = field(default_factory=list)  # temp dirs of further nodes (start_worker)

    def __post_init__(self):
        self.home.mkdir(parents=True, exist_ok=True)

    def env(self) -> dict:
        """The environment of every process the test starts: no RAY_* of the caller's, token auth with this test's
        token (``RAY_AUTH_TOKEN`` comes first in Ray's lookup, so no ``~/.ray/auth_token`` is read or written), Ray's
        temp files (a local ``ray.init``'s session, Ray Tune's lock files) under ``temp``."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        env.update(PATH=f"{BIN}:{env.get('PATH', '')}", PYTHONPATH=str(ROOT), HOME=str(self.home),
                   RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=self.token, RAY_TMPDIR=str(self.temp),
                   RAY_USAGE_STATS_ENABLED="0")
        return env

    def start_head(self, env: dict | None = None, num_cpus: int = 2, temp: Path | None = None) -> tuple[str, str]:
        """``ray start --head`` on 127.0.0.1 with free ports and this test's temp dir (or ``temp``, inside it), in a
        session of its own (so every process it leaves running is in one process group that :meth:`stop` knows).
        Returns the dashboard URL and the GCS address."""
        ports = {"port": _free_port(), "dashboard-port": _free_port(), "ray-client-server-port": _free_port(),
                 "node-manager-port": _free_port(), "object-manager-port": _free_port(),
                 "dashboard-agent-listen-port": _free_port(), "metrics-export-port": _free_port()}
        cmd = [str(BIN / "ray"), "start", "--head", f"--num-cpus={num_cpus}", "--dashboard-host=127.0.0.1",
               f"--temp-dir={temp or self.temp}", "--disable-usage-stats", *[f"--{k}={v}" for k, v in ports.items()]]
        self._ray_start(cmd, env)
        return f"http://127.0.0.1:{ports['dashboard-port']}", f"127.0.0.1:{ports['port']}"

    def start_worker(self, gcs: str, num_cpus: int = 1, resources: str = "{}") -> Path:
        """A second node of the cluster at ``gcs`` on this machine (``ray start --address``), with a temp dir, ports
        and resources of its own; returns its temp dir (:meth:`node_processes` finds what runs under it)."""
        temp = Path(tempfile.mkdtemp(prefix="pst-rayw-", dir="/tmp"))
        self.node_temps.append(temp)
        ports = {"node-manager-port": _free_port(), "object-manager-port": _free_port(),
                 "dashboard-agent-listen-port": _free_port(), "metrics-export-port": _free_port(),
                 "runtime-env-agent-port": _free_port(), "min-worker-port": 0, "max-worker-port": 0}
        cmd = [str(BIN / "ray"), "start", f"--address={gcs}", f"--num-cpus={num_cpus}", f"--resources={resources}",
               f"--temp-dir={temp}", "--disable-usage-stats", *[f"--{k}={v}" for k, v in ports.items()]]
        self._ray_start(cmd, None)
        return temp

    def _ray_start(self, cmd: list[str], env: dict | None) -> None:
        proc = subprocess.Popen(cmd, env=env or self.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, start_new_session=True)
        self.pgids.append(proc.pid)  # its own session: process group id = its pid, inherited by what it starts
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, (out + err)[-3000:]

    def node_processes(self, temp: Path) -> list:
        """The live processes of the node whose temp dir is ``temp`` (raylet, its workers and their children)."""
        import psutil

        roots = []
        for p in psutil.process_iter():
            try:
                if p.pid != os.getpid() and _names(str(temp), p.cmdline()):
                    roots.append(p)
            except (psutil.Error, OSError):
                pass
        found = {p.pid: p for p in roots}
        for p in roots:
            try:
                found.update((c.pid, c) for c in p.children(recursive=True))
            except psutil.Error:
                pass
        return [p for p in found.values() if _alive(p)]

    def processes(self) -> list:
        """The live processes this test started through Ray, and only those: the members of its ``ray start``
        process groups, every process whose command line names its temp dir (GCS, raylet, dashboard, monitors of
        a ``ray start`` or of a local ``ray.init``), and every descendant of those (Ray workers, job drivers and
        dashboard modules: a worker gets a process group of its own and retitles itself ``ray::...``)."""
        import psutil

        roots = {}
        for p in psutil.process_iter():
            try:
                if p.pid != os.getpid() and (os.getpgid(p.pid) in self.pgids or any(
                        _names(str(t), p.cmdline()) for t in (self.temp, *self.node_temps))):
                    roots[p.pid] = p
            except (psutil.Error, OSError):
                pass
        found = dict(roots)
        for p in roots.values():
            try:
                found.update((c.pid, c) for c in p.children(recursive=True))
            except psutil.Error:
                pass
        found.pop(os.getpid(), None)
        return [p for p in found.values() if _alive(p)]

    def stop(self, grace: float = 3, wait: float = 20) -> list[str]:
        """SIGTERM the processes :meth:`processes` finds (a raylet then stops its workers), SIGKILL whatever is left
        after ``grace`` seconds (the GCS and the autoscaler monitor ignore SIGTERM for longer); return what is still
        alive after ``wait`` seconds more (nothing, or the test fails). Every process found in any round is watched,
        so a worker whose raylet died first is not lost."""
        import psutil

        seen = {}
        for sig, timeout in ((signal.SIGTERM, grace), (signal.SIGKILL, wait)):
            seen.update((p.pid, p) for p in self.processes())
            for p in seen.values():
                try:
                    if _alive(p):
                        p.send_signal(sig)
                except psutil.Error:
                    pass
            deadline = time.time() + timeout
            while any(_alive(p) for p in seen.values()) and time.time() < deadline:
                time.sleep(0.1)
        seen.update((p.pid, p) for p in self.processes())
        return [_describe(p) for p in seen.values() if _alive(p)]

    def close(self) -> list[str]:
        left = self.stop()
        for t in (self.temp, *self.node_temps):
            shutil.rmtree(t, ignore_errors=True)
        return left


def _describe(p) -> str:
    import psutil

    try:
        return f"{p.pid} {' '.join(p.cmdline())[:200]}"
    except psutil.Error:
        return f"{p.pid} (gone)"


def _alive(p) -> bool:
    import psutil

    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


@pytest.fixture
def own_ray(tmp_path):
    """A test's own Ray state (:class:`OwnRay`); afterwards, the Ray processes it started are stopped (and only
    those) and its temp dir removed."""
    state = OwnRay(tmp_path / "home")
    yield state
    left = state.close()
    assert not left, f"Ray processes still running after teardown: {left}"


# ---------------------------------------------------------------------------------------------------------------
# real searches on a real local Ray


def _tune(out: Path, *extra: str) -> list[str]:
    """``pst-dist tune`` of the tiny config into ``out``."""
    return [str(BIN / "pst-dist"), "tune", "--config", str(TINY), f"--tune.out={out}", *extra]


def _descendants(pid: int):
    import psutil

    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


@pytest.mark.slow  # 3+ minutes; the default run keeps a two-node search (restores: the slow two-node test too)
@pytest.mark.multiproc
def test_a_killed_worker_is_retried_from_its_checkpoint_and_the_search_completes(own_ray, tmp_path):
    out = tmp_path / "search"
    proc = subprocess.Popen(
        _tune(out, "--tune.scheduler=fifo", "--tune.num_samples=2", "--tune.workers=2", "--tune.max_failures=2",
              "--data.synthetic_train=4800"),
        env=own_ray.env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    own_ray.pgids.append(proc.pid)  # the driver and what its local ray.init starts: stopped at teardown
    killed = None
    try:
        deadline = time.time() + 400
        while killed is None and time.time() < deadline and proc.poll() is None:
            # a trial's first checkpoint has reached Tune (so Ray Train's controller registered it: a report still in
            # flight when its worker dies is lost with it)
            if any(f.stat().st_size for f in (out / "tiny").glob("run_trial_*/result.json")):
                workers = [p for p in _descendants(proc.pid) if "RayTrainWorker" in " ".join(p.cmdline())]
                if workers:
                    killed = workers[-1].pid
                    os.kill(killed, signal.SIGKILL)
                    break
            time.sleep(0.2)
        output, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert killed is not None, "no Ray Train worker to kill"
    assert proc.returncode == 0, output[-5000:]
    rows = list(csv.DictReader(open(out / "tiny" / "results.csv")))
    assert len(rows) == 2 and all(r["status"] == "completed" and r["epochs"] == "4" for r in rows), rows
    restores = [json.loads(line) for f in (out / "tiny" / "trials").glob("*/restores.jsonl") for line in open(f)]
    assert restores, "no trial restored from a checkpoint after the kill"
    assert all(r["epoch"] >= 1 for r in restores)  # resumed from a reported checkpoint, not from scratch
    for r in rows:  # every epoch of every trial reported once to the end (a restart re-runs only the lost epoch)
        records = [json.loads(line) for line in open(out / "tiny" / "trials" / r["trial"] / "metrics.jsonl")]
        epochs = [int(x["epoch"]) for x in records if "eval/val_acc" in x]
        assert epochs[-1] == 4 and set(epochs) == {1, 2, 3, 4}


@pytest.mark.slow
@pytest.mark.multiproc
def test_pbt_search_exploits_through_checkpoints(own_ray, tmp_path):
    out = tmp_path / "search"
    run = subprocess.run(
        _tune(out, "--tune.scheduler=pbt", "--tune.num_samples=2", "--train.epochs=3", "--tune.freeze_epochs=[0.5]",
              "--tune.warm_epochs=[0.5]"),
        env=own_ray.env(), capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, (run.stdout + run.stderr)[-5000:]
    rows = list(csv.DictReader(open(out / "tiny" / "results.csv")))
    assert len(rows) == 2 and all(r["status"] == "completed" and r["epochs"] == "3" for r in rows), rows
    assert list((out / "tiny").glob("run_trial_*/checkpoint_*"))  # Tune-level checkpoints, one per generation
    exploits = (out / "tiny" / "pbt_global.txt").read_text().splitlines()
    assert exploits  # a weaker trial was cloned from a stronger one's checkpoint ...
    cloned = []  # restores of a trial from another trial's Tune checkpoint
    for row in rows:
        restores = out / "tiny" / "trials" / row["trial"] / "restores.jsonl"
        for r in (json.loads(line) for line in open(restores)) if restores.is_file() else []:
            if "/checkpoint_" in r["from"] and f"run_trial_{row['trial']}_" not in r["from"]:
                cloned.append(r)
    assert cloned, "no trial resumed from another trial's checkpoint"
    assert "# PBT: these are the trial's settings at its end" in (out / "tiny" / "best_schedule.toml").read_text()


def test_tune_cli_refuses_bad_input_before_starting_ray(own_ray, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    out.mkdir()
    user = place_marker(tmp_path)  # a file where a search's directory would go: refused before Ray (was: after)
    cases = [(["--tune.unfreeze_groups=[0, 5]"], "group 5: the head"),
             ([f"--tune.out={user}"], f"tune.name='tiny': {user / 'tiny'} cannot be created or written: {user} is a "
                                      f"file, not a directory"),
             (['--tune.attacks=["em"]', f"--tune.poisons={user / 'p'}"], f"tune.poisons='{user / 'p'}'"),
             (["--train.epochs=2"], "no schedule fits"),
             (["--tune.scheduler=hyperband"], "tune.scheduler='hyperband'"),
             (['--tune.attacks=["em", "nope"]'], "tune.attacks: unknown attack(s) ['nope']"),
             (['--tune.attacks=["em"]', "--tune.scheduler=pbt"], "tune.scheduler='pbt' with tune.attacks=['em']"),
             (['--tune.attacks=["em"]', '--bench.attack_overrides.em=["poison.steps=-1"]'],
              "the em run (bench.attack_overrides.em=['poison.steps=-1']): poison: steps=-1"),
             (['--tune.attacks=["em"]', "--tune.seeds=[0, 1]", '--bench.attack_overrides.em=["poison.seed=3"]'],
              "bench.attack_overrides.em=['poison.seed=3']: a search's runs take their seeds from tune.seeds"),
             (["--data.val_size=0"], "data.val_size=0 leaves no validation images"),
             (["--tune.release_epochs=[0.0, 1.0]"], "tune.release_epochs=[0.0, 1.0]: choices must be > 0"),
             (["--tune.name=.."], "tune.name='..': a folder name"),
             (["--data.source=fashion-mnist", f"--data.root={tmp_path / 'nowhere'}"],
              f"Fashion-MNIST directory not found: {tmp_path / 'nowhere'}"),
             (["--resume"], "--resume: no search to continue")]
    # two through the installed command (--resume imports ray.tune, which changes sys.path for the process); the
    # others in this process, with the same environment (each would cost a Python and torch start-up in a
    # subprocess): the CLI's own parsing, checks and exit code, with Ray's start replaced by a failure
    for extra, message in (cases[0], cases[-1]):
        run = subprocess.run(_tune(out, *extra), env=own_ray.env(), capture_output=True, text=True, timeout=120)
        assert run.returncode == 2 and message in run.stderr, (extra, run.stderr[-2000:])
        assert "Started a local Ray" not in run.stderr
    for k, v in own_ray.env().items():
        monkeypatch.setenv(k, v)
    for k in [k for k in os.environ if k.startswith("RAY_") and k not in own_ray.env()]:
        monkeypatch.delenv(k)

    def no_ray(*_a, **_kw):
        raise AssertionError("Ray was started for a search whose input is bad")

    monkeypatch.setattr("tune.search.init_ray", no_ray)
    for extra, message in cases[1:-1]:
        code = main(_tune(out, *extra)[1:])
        err = capsys.readouterr().err
        assert code == 2 and message in err, (extra, err[-2000:])
    assert not list(out.iterdir()) and user.read_text() == MARKER_TEXT  # nothing written
    assert not own_ray.processes() and not list(own_ray.temp.iterdir())  # no Ray started


@pytest.mark.multiproc
def test_a_trial_this_machine_cannot_hold_is_refused_before_poisons_are_made_even_with_a_cap(own_ray, tmp_path):
    """tune.max_concurrent set: a local Ray still checks that one trial fits (it would wait for ever), and refuses
    before the search's poisons take their minutes."""
    out = tmp_path / "out"
    run = subprocess.run(_tune(out, "--tune.max_concurrent=1", "--tune.cpus_per_worker=512",
                               '--tune.attacks=["classwise_noise"]', f"--tune.poisons={tmp_path / 'poisons'}"),
                         env=own_ray.env(), capture_output=True, text=True, timeout=300)
    assert run.returncode == 2 and "one trial needs tune.workers x (tune.cpus_per_worker CPUs) = 1 x (512)" in \
        run.stderr, run.stderr[-3000:]
    assert not (tmp_path / "poisons").exists() and not out.exists()


def test_a_new_search_never_writes_over_a_user_s_file_named_as_its_record(tmp_path, monkeypatch, capsys):
    mine = tmp_path / "out" / "tiny" / "search_config.toml"
    mine.parent.mkdir(parents=True)
    mine.write_text("my own notes\n")

    def no_ray(*_a, **_kw):
        raise AssertionError("Ray was started for a search that would write over a user's file")

    monkeypatch.setattr("tune.search.init_ray", no_ray)
    assert main(_tune(tmp_path / "out")[1:]) == 2
    assert "is not a search's recorded config" in capsys.readouterr().err
    assert mine.read_text() == "my own notes\n" and sorted(p.name for p in mine.parent.iterdir()) == [mine.name]
    mine.unlink()  # a user's results.csv there instead: the reports would replace it at the search's end
    (mine.parent / "results.csv").write_text("my own table\n")
    assert main(_tune(tmp_path / "out")[1:]) == 2
    assert "holds results.csv, which a search writes, but no search_config.toml" in capsys.readouterr().err
    assert sorted(p.name for p in mine.parent.iterdir()) == ["results.csv"]


def _ctrl_c(own_ray: OwnRay, args: list[str], ready) -> tuple[int, str]:
    """Start the search ``args``, press Ctrl-C (SIGINT) once ``ready()``, and return its exit code and output."""
    proc = subprocess.Popen(args, env=own_ray.env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    own_ray.pgids.append(proc.pid)
    try:
        deadline = time.time() + 400
        while time.time() < deadline and proc.poll() is None and not ready():
            time.sleep(0.2)
        assert proc.poll() is None, "the search ended before it could be interrupted"
        os.kill(proc.pid, signal.SIGINT)  # Ctrl-C: Tune saves its state and stops
        said = proc.communicate(timeout=300)[0]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return proc.returncode, said


@pytest.mark.slow
@pytest.mark.multiproc
def test_an_interrupted_search_resumes_without_retraining_finished_trials(own_ray, tmp_path):
    out = tmp_path / "search"
    args = _tune(out, "--tune.scheduler=fifo", "--tune.num_samples=3", "--tune.max_concurrent=1")
    code, said = _ctrl_c(own_ray, args, lambda: bool(list((out / "tiny").glob("trials/*/summary.json"))))
    finished = {p.parent.name for p in (out / "tiny").glob("trials/*/summary.json")}
    assert finished
    # a stopped search is not a search's result: the shell sees the interrupt, and no best schedule is named
    assert code == 130 and "unfinished: no best schedule; continue it with --resume" in said, said[-3000:]
    assert not (out / "tiny" / "best_schedule.toml").exists()
    assert "Stopped before its end" in (out / "tiny" / "results.md").read_text()
    run = subprocess.run([*args, "--resume=auto"], env=own_ray.env(), capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, (run.stdout + run.stderr)[-5000:]
    assert f"[tune] --resume=auto: continuing the search in {out / 'tiny'}" in run.stderr
    assert (out / "tiny" / "best_schedule.toml").is_file()
    assert "Stopped" not in (out / "tiny" / "results.md").read_text()
    rows = list(csv.DictReader(open(out / "tiny" / "results.csv")))
    assert len(rows) == 3 and all(r["status"] == "completed" and r["epochs"] == "4" for r in rows), rows
    for trial in finished:  # trained once: four epochs in its metrics, not eight
        records = [json.loads(line) for line in open(out / "tiny" / "trials" / trial / "metrics.jsonl")]
        assert [int(x["epoch"]) for x in records if "eval/val_acc" in x] == [1, 2, 3, 4]


@pytest.mark.slow
@pytest.mark.multiproc
def test_ctrl_c_while_every_trial_runs_is_a_stopped_search(own_ray, tmp_path):
    """Ray's clean-up marks the trials it stops as terminated in the results fit returns: the search reads the state
    Ray saved before it, where they are still running, so a stop with no trial left to start is still a stop."""
    out = tmp_path / "search"
    # 12 epochs: the trial ahead must not finish its remaining epochs (about a second each) while Tune stops on the
    # Ctrl-C sent after its first (with 4 epochs, one finished at this stop's slow run)
    args = _tune(out, "--tune.scheduler=fifo", "--tune.num_samples=2", "--tune.max_concurrent=2", "--train.epochs=12")
    code, said = _ctrl_c(own_ray, args, lambda: any("eval/val_acc" in f.read_text()  # an epoch of one trial done
                                                    for f in (out / "tiny").glob("trials/*/metrics.jsonl")))
    assert not list((out / "tiny").glob("trials/*/summary.json")), "a trial finished before the interrupt"
    assert code == 130 and "stopped with 2 trial(s) unfinished" in said, said[-3000:]
    assert not (out / "tiny" / "best_schedule.toml").exists()


# ---------------------------------------------------------------------------------------------------------------
# two Ray nodes on this machine: a head and a worker node, each with one CPU, their own temp dirs and ports; the
# search's storage is a directory that is neither node's working directory nor the driver's


def _two_nodes(own_ray: OwnRay) -> tuple[str, str, str, Path, dict]:
    """Head (1 CPU) and worker node (1 CPU, resource ``node_b``); returns the dashboard URL, the GCS address, the
    worker node's id and temp dir, and the node ids by role."""
    dashboard, gcs = own_ray.start_head(num_cpus=1)
    temp_b = own_ray.start_worker(gcs, num_cpus=1, resources='{"node_b": 1}')
    env = own_ray.env()
    nodes: list = []
    deadline = time.time() + 60
    while len(nodes) < 2 and time.time() < deadline:
        out = subprocess.run([str(BIN / "ray"), "list", "nodes", "--address", dashboard, "--format", "json"],
                             env=env, capture_output=True, text=True, timeout=60)
        nodes = [n for n in json.loads(out.stdout or "[]") if n.get("state") == "ALIVE"] if out.returncode == 0 else []
        time.sleep(0.5)
    assert len(nodes) == 2, nodes
    ids = {("head" if n["is_head_node"] else "b"): n["node_id"] for n in nodes}
    return dashboard, gcs, ids["b"], temp_b, ids


def _cluster_tune(own_ray: OwnRay, gcs: str, storage: Path, cwd: Path, *extra: str) -> subprocess.Popen:
    cwd.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        _tune(storage, "--tune.scheduler=fifo", "--tune.num_samples=2", "--tune.use_gpu=no",
              "--tune.max_concurrent=2", "--tune.max_failures=2", "--data.synthetic_train=400", *extra),
        env={**own_ray.env(), "RAY_ADDRESS": gcs}, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, start_new_session=True)
    own_ray.pgids.append(proc.pid)
    return proc


def _epochs_on(search: Path, node: str) -> dict[str, int]:
    """Trial -> how many epochs it has trained on ``node`` so far (its run directory's nodes.jsonl)."""
    out: dict[str, int] = {}
    for f in search.glob("trials/*/nodes.jsonl"):
        for line in f.read_text().splitlines():
            if line.strip() and json.loads(line)["node_id"] == node:
                out[f.parent.name] = out.get(f.parent.name, 0) + 1
    return out


def _registered(train_run: Path) -> int:
    """The epoch of the newest checkpoint Ray Train has registered for a trial's Train run (its checkpoint manager's
    snapshot in storage), 0 if none yet."""
    try:
        latest = json.loads((train_run / "checkpoint_manager_snapshot.json").read_text())["latest_checkpoint_result"]
    except (OSError, ValueError, KeyError):  # not written yet, or caught mid-write
        return 0
    found = re.fullmatch(r"epoch_(\d{4})", str((latest or {}).get("checkpoint_dir_name")))
    return int(found.group(1)) if found else 0


@pytest.mark.multiproc
def test_job_submit_of_a_search_onto_two_nodes_then_train_its_best_schedule(own_ray, tmp_path):
    """What README.md tells a user to do on a cluster: ``ray job submit -- bash -c '... python tune/run.py ...'`` onto
    a head and a worker node. The trials (Ray Train, DeepSpeed ZeRO-2, the default ASHA scheduler) run one on each
    node and write results, TensorBoard and checkpoints to storage that is neither node's working directory nor the
    driver's; then ``pst-dist train`` of the best schedule the search wrote."""
    dashboard, gcs, node_b, _, ids = _two_nodes(own_ray)
    storage, driver = tmp_path / "storage", tmp_path / "driver"
    driver.mkdir()
    search_cmd = [sys.executable, str(ROOT / "tune" / "run.py"), "--config", str(TINY), f"--tune.out={storage}",
                  "--tune.num_samples=2", "--tune.use_gpu=no", "--tune.max_concurrent=2", "--tune.unfreeze_groups=[0]",
                  "--train.epochs=3", "--data.synthetic_train=300"]  # short: the default test run
    # ASHA (grace 1, reduction 2) stops no trial here: the trials differ only in the release stage's lr multiplier
    # (one release order, one threshold, the same seed; the warm-up trigger is read at epoch ends), so their epochs 1
    # and 2 are the same and they tie at its rungs 1 and 2
    job = subprocess.run([str(BIN / "ray"), "job", "submit", "--address", dashboard, "--", "bash", "-c",
                          f"cd {shlex.quote(str(driver))} && exec {shlex.join([*search_cmd, '--resume=auto'])}"],
                         env=own_ray.env(), capture_output=True, text=True, timeout=600)
    output = job.stdout + job.stderr
    assert job.returncode == 0 and "succeeded" in output, output[-5000:]
    assert "each trial asks for 1 worker(s) x (1 CPU)" in output
    assert f"[tune] --resume=auto: no search yet in {storage / 'tiny'}" in output  # the job's one entrypoint began it
    search = storage / "tiny"
    rows = list(csv.DictReader(open(search / "results.csv")))
    assert len(rows) == 2 and all(r["status"] == "completed" and r["epochs"] == "3" for r in rows), rows
    assert {r["nodes"] for r in rows} == {ids["head"], node_b}  # one trial on each node, shown in the results
    assert not list(driver.iterdir())  # nothing in the driver's working directory
    assert all((search / "train" / r["trial"] / "epoch_0003").is_dir() for r in rows)  # checkpoints in storage
    assert (search / "trials.png").stat().st_size > 1000
    for r in rows:  # TensorBoard per trial
        assert list((search / "trials" / r["trial"] / "tb").glob("events.out.tfevents.*"))
    text = (search / "best_schedule.toml").read_text()
    assert "chosen on clean validation accuracy" in text and "# Ties: among equals, the first trial id" in text
    vals = {r["trial"]: float(r["final_val_acc"]) for r in rows}
    assert max(vals.values()) == pytest.approx(float(text.split("final epoch: ")[1].split(" %")[0]) / 100, abs=1e-4)
    # the search recorded what it started with; a resume that would train something else is refused before Ray
    assert load_config(search / "search_config.toml").train.lr == load_config(str(TINY)).train.lr
    best, record = (search / "best_schedule.toml").read_bytes(), (search / "search_config.toml").read_bytes()
    on_head = {**own_ray.env(), "RAY_ADDRESS": gcs}  # the same command again on the cluster (tune/run.py needs one)
    changed = subprocess.run([*search_cmd, "--resume", "--train.lr=0.9", "--train.threads=1"], env=on_head,
                             capture_output=True, text=True, timeout=120)
    assert changed.returncode == 2 and "train.lr: " in changed.stderr, changed.stderr[-2000:]
    assert "train.threads: " not in changed.stderr  # a resume may change it
    assert (search / "best_schedule.toml").read_bytes() == best
    again = subprocess.run(search_cmd, env=on_head, capture_output=True, text=True, timeout=120)  # no --resume
    assert again.returncode == 2 and f"{search} already holds a search" in again.stderr, again.stderr[-2000:]
    assert (search / "best_schedule.toml").read_bytes() == best
    assert (search / "search_config.toml").read_bytes() == record and len(list(search.glob("run_trial_*"))) == 2
    run = subprocess.run([str(BIN / "pst-dist"), "train", "--config", str(search / "best_schedule.toml"),
                          f"--log.run_dir={tmp_path / 'best'}"], env=own_ray.env(), capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads((tmp_path / "best" / "summary.json").read_text())
    assert len(summary["val_curve"]) == 3 and isinstance(summary["stage_history"], list)
    # it trained the schedule the search chose (the run records what trained it)
    chosen = load_config(search / "best_schedule.toml").schedule
    assert load_config(tmp_path / "best" / "config.toml").schedule == chosen and len(chosen.stages) > 1


@pytest.mark.multiproc
def test_ray_submit_s_search_joins_the_cluster_started_on_its_node(own_ray, tmp_path):
    """``ray submit`` runs tune/run.py on the head without RAY_ADDRESS (only ``ray job submit`` sets it): it joined
    no cluster, and a private Ray ran the whole search on the head. It now joins the one ``ray start`` started
    there (the address file under Ray's temp dir: this test's, RAY_TMPDIR), and is refused when none runs."""
    env = own_ray.env()  # no RAY_* of the caller's: RAY_ADDRESS unset, as under ray submit
    cmd = [sys.executable, str(ROOT / "tune" / "run.py"), "--config", str(TINY), f"--tune.out={tmp_path / 's'}",
           "--tune.num_samples=1", "--tune.use_gpu=no", "--tune.unfreeze_groups=[0]", "--train.epochs=3",
           "--tune.scheduler=fifo", "--data.synthetic_train=300"]
    alone = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert alone.returncode == 2 and "no `ray start` ran on this machine" in alone.stderr, alone.stderr[-2000:]
    assert not (tmp_path / "s").exists()
    stale = own_ray.temp / "ray" / "ray_current_cluster"  # what a cluster stopped without `ray stop` leaves
    stale.parent.mkdir()
    stale.write_text(f"127.0.0.1:{_free_port()}")
    gone = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert gone.returncode == 2 and "does not answer" in gone.stderr, gone.stderr[-2000:]
    stale.unlink()
    _, gcs = own_ray.start_head(num_cpus=1, temp=own_ray.temp / "ray")  # where Ray records it under RAY_TMPDIR
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-3000:]
    port = gcs.rsplit(":", 1)[1]  # (Ray records the node's own IP)
    joined = re.search(r"joining the Ray cluster started on this node, at (\S+:" + port + ")", out)
    assert joined and f"Ray: cluster at {joined[1]}" in out, out[-3000:]
    rows = list(csv.DictReader(open(tmp_path / "s" / "tiny" / "results.csv")))
    assert len(rows) == 1 and rows[0]["status"] == "completed", rows


@pytest.mark.slow
@pytest.mark.multiproc
def test_a_dead_node_s_trial_is_restored_from_storage_on_the_other(own_ray, tmp_path):
    _, gcs, node_b, temp_b, ids = _two_nodes(own_ray)
    storage = tmp_path / "storage"
    epochs = 8  # node b is killed between its trial's epochs 2 and 7: a wide window for a loaded machine
    proc = _cluster_tune(own_ray, gcs, storage, tmp_path / "driver", f"--train.epochs={epochs}")
    killed, on_b = [], {}
    try:
        deadline = time.time() + 500
        while not killed and time.time() < deadline and proc.poll() is None:
            on_b = _epochs_on(storage / "tiny", node_b)
            if any(2 <= n < epochs and _registered(storage / "tiny" / "train" / t) >= 1 for t, n in on_b.items()):
                # node b's trial has trained two or more of its epochs and Ray Train has registered a checkpoint of it
                # in storage: kill the whole node (raylet, workers) in the middle of the trial. (A checkpoint uploaded
                # but not yet registered, the controller polls its workers every 2 s, is lost with its node: Ray
                # starts the trial again from its last registered one, here none)
                for p in own_ray.node_processes(temp_b):
                    try:
                        p.kill()
                        killed.append(p.pid)
                    except Exception:  # noqa: BLE001 - already gone
                        pass
                break
            time.sleep(0.2)
        output, _ = proc.communicate(timeout=900)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert killed, f"node b's trial was never between epochs 2 and {epochs - 1} with a registered checkpoint: {on_b}"
    assert proc.returncode == 0, output[-5000:]
    rows = list(csv.DictReader(open(storage / "tiny" / "results.csv")))
    assert len(rows) == 2 and all(r["status"] == "completed" and r["epochs"] == str(epochs) for r in rows), rows
    moved = [r for r in rows if r["nodes"].startswith(node_b)]
    assert moved and moved[0]["nodes"] == f"{node_b} > {ids['head']}", [r["nodes"] for r in rows]  # b, then head
    restores = [json.loads(line) for line in open(storage / "tiny" / "trials" / moved[0]["trial"] / "restores.jsonl")]
    assert restores and restores[0]["node_id"] == ids["head"] and restores[0]["epoch"] >= 1
    assert str(storage) in restores[0]["from"]  # from the checkpoint in storage


def test_a_search_over_attacks_makes_its_poisons_once_and_gives_each_run_its_attack(tmp_path):
    """tune.attacks without Ray: the poisons are made once where tune.poisons says (a second search reads them; one
    made with other settings is refused, naming the setting), each attack's run records its attack, and the views
    and consistency weights offered are what a trial's stages get."""
    from tune.attacks import attack_config, prepare_poisons, store_dir, worst_case
    from tune.space import grid_size, trial_config

    cfg = load_config(str(TINY), ["--data.synthetic_train=300", '--tune.attacks=["none", "classwise_noise"]',
                                  f"--tune.poisons={tmp_path / 'poisons'}", '--tune.views=["quantize", "blur"]',
                                  "--tune.consistency=[0.0, 1.0]", "--tune.release_ce=[0.0, 0.5]",
                                  '--tune.release_views=["randblur:2"]', "--tune.last_ce=[1.0]",
                                  "--tune.release_smoothing=[0.1]"])
    assert prepare_poisons(cfg, log=lambda m: None).keys() == {"classwise_noise_seed0"}
    assert store_dir(cfg, "classwise_noise").is_dir() and store_dir(cfg, "none") is None
    assert prepare_poisons(cfg, log=lambda m: None) == {}  # cached: read, not made again
    other = load_config(str(TINY), ["--data.synthetic_train=300", '--tune.attacks=["classwise_noise"]',
                                    f"--tune.poisons={tmp_path / 'poisons'}", "--poison.eps=0.05"])
    with pytest.raises(ConfigError, match="other poison settings.*tune.poisons"):
        prepare_poisons(other, log=lambda m: None)
    theirs = tmp_path / "theirs"
    (theirs / "classwise_noise_seed0").mkdir(parents=True)
    (theirs / "classwise_noise_seed0" / "notes.txt").write_text("a user's file\n")
    mine = load_config(str(TINY), ["--data.synthetic_train=300", '--tune.attacks=["classwise_noise"]',
                                   f"--tune.poisons={theirs}"])
    with pytest.raises(ConfigError, match="not a poison store"):
        prepare_poisons(mine, log=lambda m: None)
    assert (theirs / "classwise_noise_seed0" / "notes.txt").read_text() == "a user's file\n"
    assert grid_size(cfg, 4) == 2 * 2 * 2 * 2 * 2 * 2  # orders x mults^2 x views x consistency x release_ce
    params = {"skeleton": "warm=1,freeze=1,release=1,order=1-0", "threshold": 0.2, "mult_0": 0.1, "mult_1": 1.0,
              "view": "blur", "consistency": 1.0, "release_ce": 0.5, "release_view": "randblur:2", "last_ce": 1.0,
              "release_smoothing": 0.1}
    trial = trial_config(cfg, params)
    trial.log.run_dir = str(tmp_path / "trial")
    run = attack_config(trial, "classwise_noise")
    assert run.poison.kind == "classwise_noise" and run.log.run_dir == str(tmp_path / "trial" / "classwise_noise")
    assert [s.loss.view for s in run.schedule.stages] == ["blur", "blur", "randblur:2", "randblur:2"]
    assert run.schedule.stages[0].trigger.view == "blur"
    assert [s.loss.consistency for s in run.schedule.stages][-2:] == [1.0, 1.0]  # the release stages only
    assert [s.loss.ce for s in run.schedule.stages][-2:] == [0.5, 1.0]  # release_ce, then the last stage's
    assert [s.loss.label_smoothing for s in run.schedule.stages] == [0.0, 0.0, 0.1, 0.1]  # the release stages only
    assert run.schedule.stages[0].loss.consistency == 0.0 and run.schedule.stages[1].loss.ce == 0.0
    logs = {"none": {"eval/val_acc": 0.8, "eval/test_acc": 0.7}, "classwise_noise": {"eval/val_acc": 0.6,
                                                                                      "eval/test_acc": 0.75}}
    assert worst_case(logs) == {"val_acc": 0.6, "val_acc_none": 0.8, "val_acc_classwise_noise": 0.6,
                                "test_acc": 0.7, "test_acc_none": 0.7, "test_acc_classwise_noise": 0.75}
    for order in (["none", "classwise_noise"], ["classwise_noise", "none"]):  # NaN is the worst case in any order
        nan = {"none": {"eval/val_acc": float("nan"), "eval/test_acc": 0.7},
               "classwise_noise": {"eval/val_acc": 0.6, "eval/test_acc": 0.75}}
        out = worst_case({a: nan[a] for a in order})
        assert math.isnan(out["val_acc"]) and out["test_acc"] == 0.7, (order, out)


def test_a_search_over_seeds_trains_each_attack_on_each_seed_s_poison_and_averages(tmp_path):
    """tune.seeds without Ray: one run per (attack, seed), each on that seed's poison store (made once, the cached
    seed read) with that train seed, in <attack>/seed<s>; an attack's figure is its mean over seeds, and the
    objective the worst of those."""
    from pst_dist.data.pipeline import build_data
    from pst_dist.matrix import cell_data_cfg
    from tune.attacks import attack_config, attack_data, prepare_poisons, trial_runs, worst_case
    from tune.space import trial_config

    common = ["--data.synthetic_train=300", '--tune.attacks=["none", "classwise_noise"]',
              f"--tune.poisons={tmp_path / 'poisons'}"]
    one = load_config(str(TINY), common)
    assert prepare_poisons(one, log=lambda m: None).keys() == {"classwise_noise_seed0"}
    cfg = load_config(str(TINY), [*common, "--tune.seeds=[0, 3]"])
    assert prepare_poisons(cfg, log=lambda m: None).keys() == {"classwise_noise_seed3"}  # seed 0's is cached
    assert trial_runs(cfg) == {"none/seed0": ("none", 0), "none/seed3": ("none", 3),
                               "classwise_noise/seed0": ("classwise_noise", 0),
                               "classwise_noise/seed3": ("classwise_noise", 3)}
    trial = trial_config(cfg, {"skeleton": "warm=1,freeze=1,release=1,order=1-0", "threshold": 0.2, "mult_0": 1.0,
                               "mult_1": 1.0})
    trial.log.run_dir = str(tmp_path / "trial")
    runs = {r: attack_config(trial, a, s) for r, (a, s) in trial_runs(trial).items()}
    assert {r: (c.poison.kind, c.poison.seed, c.train.seed, c.log.run_dir) for r, c in runs.items()} == {
        r: (a, s, s, str(tmp_path / "trial" / a / f"seed{s}")) for r, (a, s) in trial_runs(cfg).items()}
    three = attack_data(runs["classwise_noise/seed3"], trial, "classwise_noise").poisoned_train
    zero = attack_data(runs["classwise_noise/seed0"], trial, "classwise_noise").poisoned_train
    assert not torch.equal(three, zero), "seed 3's run read seed 0's poison"
    own = build_data(cell_data_cfg(runs["classwise_noise/seed3"], str(tmp_path / "poisons" / "classwise_noise_seed3")))
    assert torch.equal(three, own.poisoned_train), "seed 3's run did not read the seed-3 store"
    logs = {"none/seed0": {"eval/val_acc": 0.8, "eval/test_acc": 0.7},
            "none/seed3": {"eval/val_acc": 0.9, "eval/test_acc": 0.7},
            "classwise_noise/seed0": {"eval/val_acc": 0.6, "eval/test_acc": 0.75},
            "classwise_noise/seed3": {"eval/val_acc": 0.9, "eval/test_acc": 0.65}}
    out = worst_case(logs, trial_runs(cfg))
    assert out == pytest.approx({"val_acc": 0.75, "val_acc_none": 0.85, "val_acc_classwise_noise": 0.75,
                                 "test_acc": 0.7, "test_acc_none": 0.7, "test_acc_classwise_noise": 0.7})


@pytest.mark.slow  # ~4 minutes on 2 cores; the pieces without Ray are in the default run (the test above)
@pytest.mark.multiproc
def test_a_search_over_attacks_takes_the_worst_case_and_its_runs_train_as_alone(own_ray, tmp_path):
    """tune.attacks: every trial trains one run per attack in lockstep; the objective (final_val_acc) is the worst
    attack's validation accuracy; the views and consistency weights offered are what the trials train with; a run
    trained epoch by epoch in a trial ends where the same run trained alone ends."""
    out, poisons = tmp_path / "search", tmp_path / "poisons"
    short = ["--tune.unfreeze_groups=[0]", "--train.epochs=3", "--tune.num_samples=2", "--tune.scheduler=fifo",
             "--deepspeed.enabled=false", "--data.synthetic_train=300", '--tune.attacks=["none", "classwise_noise"]',
             f"--tune.poisons={poisons}", '--tune.views=["quantize", "blur"]', "--tune.consistency=[0.0, 1.0]"]
    run = subprocess.run(_tune(out, *short), env=own_ray.env(), capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-5000:]
    assert "making the classwise_noise poison" in run.stderr and (poisons / "classwise_noise_seed0").is_dir()
    search = out / "tiny"
    rows = list(csv.DictReader(open(search / "results.csv")))
    assert len(rows) == 2 and all(r["status"] == "completed" for r in rows), rows
    for r in rows:
        assert float(r["final_val_acc"]) == min(float(r["val_acc_none"]), float(r["val_acc_classwise_noise"]))
        assert r["view"] in ("quantize", "blur") and float(r["consistency"]) in (0.0, 1.0)
        for attack in ("none", "classwise_noise"):
            recorded = load_config(str(search / "trials" / r["trial"] / attack / "config.toml"))
            assert recorded.poison.kind == attack
            assert {s.loss.view for s in recorded.schedule.stages} == {r["view"]}
            assert recorded.schedule.stages[-1].loss.consistency == float(r["consistency"])
    best = (search / "best_schedule.toml").read_text()
    assert "worst validation accuracy over the attacks none, classwise_noise" in best
    # one trial's poisoned run, trained alone (uninterrupted) on the same poison store: the same final accuracy
    r = rows[0]
    trial = search / "trials" / r["trial"] / "classwise_noise"
    alone = subprocess.run([str(BIN / "pst-dist"), "train", "--config", str(trial / "config.toml"),
                            '--poison.kind="file"', f'--poison.path="{poisons / "classwise_noise_seed0"}"',
                            f"--log.run_dir={tmp_path / 'alone'}"], env=own_ray.env(), capture_output=True, text=True,
                           timeout=300)
    assert alone.returncode == 0, alone.stderr[-3000:]
    summary = json.loads((tmp_path / "alone" / "summary.json").read_text())
    assert summary["final_val_acc"] == float(r["val_acc_classwise_noise"])


# 42-49 s on 2 cores: slow. The default run keeps the seeds' runs and means without Ray
# (test_a_search_over_seeds_trains_each_attack_on_each_seed_s_poison_and_averages) and a search through Ray
# (the job submit onto two nodes)
@pytest.mark.slow
@pytest.mark.multiproc
def test_a_search_over_seeds_reports_the_worst_attack_s_mean_over_seeds(own_ray, tmp_path):
    """tune.seeds through Ray: each trial trains every (attack, seed) run in lockstep; the objective, the results'
    columns and the best schedule's header are the worst over the attacks of each attack's mean over its seeds,
    from the runs' own final validation accuracies; each run trained its seed's poison with its seed."""
    out, poisons = tmp_path / "search", tmp_path / "poisons"
    short = ["--tune.unfreeze_groups=[0]", "--train.epochs=2", "--tune.num_samples=1", "--tune.scheduler=fifo",
             "--deepspeed.enabled=false", "--data.synthetic_train=300", '--tune.attacks=["none", "classwise_noise"]',
             "--tune.seeds=[0, 1]", f"--tune.poisons={poisons}", "--tune.release_mults=[1.0]",
             "--tune.freeze_epochs=[0.5]", "--tune.release_epochs=[0.5]"]
    run = subprocess.run(_tune(out, *short), env=own_ray.env(), capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-5000:]
    assert {p.name for p in poisons.iterdir()} == {"classwise_noise_seed0", "classwise_noise_seed1"}
    search = out / "tiny"
    rows = list(csv.DictReader(open(search / "results.csv")))
    assert rows and all(r["status"] == "completed" for r in rows), rows
    for r in rows:
        means = {}
        for attack in ("none", "classwise_noise"):
            finals = []
            for seed in (0, 1):
                run_dir = search / "trials" / r["trial"] / attack / f"seed{seed}"
                recorded = load_config(str(run_dir / "config.toml"))
                assert (recorded.poison.kind, recorded.poison.seed, recorded.train.seed) == (attack, seed, seed)
                finals.append(json.loads((run_dir / "summary.json").read_text())["final_val_acc"])
            means[attack] = sum(finals) / 2
            assert float(r[f"val_acc_{attack}"]) == pytest.approx(means[attack], abs=1e-9)
        assert float(r["final_val_acc"]) == pytest.approx(min(means.values()), abs=1e-9)
        # what the trial reported to Tune (the objective a scheduler acts on), not only the report's recomputation
        reported = [json.loads(line) for f in search.glob(f"run_trial_{r['trial']}_*/result.json")
                    for line in f.read_text().splitlines() if line.strip()]
        last = max(reported, key=lambda x: x["epoch"])
        assert last["epoch"] == 2 and last["val_acc"] == pytest.approx(min(means.values()), abs=1e-9), last
        assert last["val_acc_none"] == pytest.approx(means["none"], abs=1e-9)
    best = (search / "best_schedule.toml").read_text()
    assert "the worst over the attacks none, classwise_noise of each attack's mean validation accuracy over seeds " \
           "[0, 1]" in best


@pytest.mark.parametrize("over,msg", [("--tune.release_ce=[0.5, -1.0]", r"tune.release_ce=\[0.5, -1.0\]"),
                                      ("--tune.last_ce=[-0.5]", r"tune.last_ce=\[-0.5\]"),
                                      ("--tune.release_smoothing=[0.1, 1.0]", r"tune.release_smoothing=\[0.1, 1.0\]"),
                                      ('--tune.release_views=["randblur:2", "smudge"]', "smudge"),
                                      ('--tune.seeds=[0, 1]', r"tune.seeds=\[0, 1\] without tune.attacks"),
                                      (['--tune.attacks=["em"]', "--tune.seeds=[1, 1]"],
                                       r"tune.seeds=\[1, 1\]: distinct"),
                                      (['--tune.attacks=["em"]', "--tune.seeds=[-1]"], r"tune.seeds=\[-1\]: distinct")])
def test_bad_release_loss_choices_are_refused_naming_the_value(over, msg):
    with pytest.raises(ConfigError, match=msg):
        load_config(TINY, [over] if isinstance(over, str) else over)


def test_a_search_space_with_a_trial_that_cannot_train_is_refused_before_ray():
    """Each loss choice may be valid alone and a combination not: release stages with view_ce 0 and a searched
    consistency of [1, 0] offer a trial whose release has no loss at all (its worker refused it inside Ray)."""
    from tune.search import check_space

    over = ["--schedule.stages.2.loss.view_ce=0", "--schedule.stages.2.loss.consistency=1"]
    cfg = load_config(TINY, [*over, "--tune.consistency=[1.0, 0.5]"])
    check_space(cfg, count_groups(cfg.model))  # every combination trains
    cfg = load_config(TINY, [*over, "--tune.consistency=[1.0, 0.0]"])
    with pytest.raises(ConfigError, match=r"offers a trial that cannot train \(tune.consistency=0.0\).*all 0"):
        check_space(cfg, count_groups(cfg.model))


def test_a_fraction_of_a_gpu_per_worker_is_refused_for_trials_of_several_workers():
    """Two workers of one trial packed on one GPU: NCCL refuses two ranks on a device, inside every trial."""
    from tune.search import declare_resources

    cfg = load_config(str(TINY), ["--tune.use_gpu=yes", "--tune.workers=2", "--tune.gpus_per_worker=0.5"])
    with pytest.raises(ConfigError, match=r"tune.gpus_per_worker=0.5 with tune.workers=2: .*NCCL"):
        declare_resources(cfg)
    cfg = load_config(str(TINY), ["--tune.use_gpu=yes", "--tune.workers=1", "--tune.gpus_per_worker=0.5"])
    assert declare_resources(cfg) == "each trial asks for 1 worker(s) x (1 CPU + 0.5 GPU)"


def test_a_stopped_search_names_no_best_schedule_and_drops_the_one_from_before_its_resume(tmp_path):
    """A search resumed after it chose a best schedule, then stopped again: the earlier choice no longer stands with
    this results table, so it goes; a file of that name pst-dist did not write stays."""
    from tune.report import write_reports

    cfg = load_config(str(TINY), [f"--tune.out={tmp_path}"])
    search = tmp_path / "tiny"
    search.mkdir()
    best = search / "best_schedule.toml"
    best.write_text("# Best schedule of the search 'tiny' (trial 0), chosen on ...\n")
    said = []
    summary = write_reports(cfg, [], search, said.append, unfinished=2)
    assert summary["best"] is None and summary["unfinished"] == 2 and not best.exists()
    assert "Stopped before its end**: 2 trial(s) unfinished" in (search / "results.md").read_text()
    assert "stopped with 2 trial(s) unfinished" in said[-1]
    best.write_text("my own notes\n")
    write_reports(cfg, [], search, said.append, unfinished=1)
    assert best.read_text() == "my own notes\n"
