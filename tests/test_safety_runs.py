"""Run directories and the training record: a new run never replaces an old one, --resume refuses another config,
NaN/inf stops the run, and every refusal is one line naming the bad value, a non-zero exit, a user's file intact and
nothing half-written. On the tiny synthetic set; a command that trains, or is stopped while training, runs the real
CLI in a subprocess, as does the first refusal below; the other refusals, which stop before any work, run
``pst_dist.cli.main`` in this process (conftest.run_cli_in_process: the same parsing, checks, message and exit code,
without a Python and torch start-up per case; tests/test_bad_data.py checks that both ways answer the same)."""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pst_dist.config import ConfigError, dump_toml, load_config

from .conftest import (
    MARKER_TEXT,
    TINY,
    assert_refused,
    dead_pid,
    lock_held_elsewhere,
    partial_files,
    place_marker,
    run_cli,
    run_cli_in_process,
    signal_after_checkpoint,
)

FAST = [*TINY, "--log.tensorboard=false"]


def _bytes(run_dir: Path) -> dict[str, bytes]:
    return {n: (run_dir / n).read_bytes() for n in ("config.toml", "checkpoint.pt", "summary.json", "metrics.jsonl")}


def _epochs(run_dir: Path) -> list[int]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(x)["epoch"] for x in lines if '"epoch"' in x]


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished 2-epoch run (made once; tests copy it)."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    out = run_cli("train", *FAST, f"--log.run_dir={run_dir}")
    assert out.returncode == 0, out.stderr[-3000:]
    return run_dir


@pytest.fixture
def run_copy(finished, tmp_path) -> Path:
    run_dir = tmp_path / "run"
    shutil.copytree(finished, run_dir)
    return run_dir


def test_a_new_run_into_a_finished_run_is_refused_and_changes_nothing(run_copy, tmp_path):
    inside, beside = place_marker(run_copy), place_marker(tmp_path)
    before = _bytes(run_copy)
    out = run_cli("train", *FAST, f"--log.run_dir={run_copy}")
    assert_refused(out, [str(run_copy), "--resume", "--overwrite", "config.toml"], [inside, beside], tmp_path, code=2)
    assert _bytes(run_copy) == before


def test_overwrite_replaces_the_run_files_only(run_copy, tmp_path):
    inside = place_marker(run_copy)
    (run_copy / "notes").mkdir()
    out = run_cli("train", *FAST, "--train.epochs=1", f"--log.run_dir={run_copy}", "--overwrite")
    assert out.returncode == 0, out.stderr[-3000:]
    assert inside.read_text() == MARKER_TEXT and (run_copy / "notes").is_dir()
    assert _epochs(run_copy) == [1], "metrics.jsonl must hold the new run alone"
    assert load_config(run_copy / "config.toml").train.epochs == 1
    assert not partial_files(tmp_path)


def test_a_run_trained_on_data_its_config_does_not_describe_is_not_resumed_evaluated_or_exported(run_copy, tmp_path):
    """A script that trains a run on data of its own making (launch/projection_screen.py) marks the run: its config
    would rebuild other data, so --resume, eval and export refuse it, naming the mark; --overwrite replaces it."""
    (run_copy / "outside_data.json").write_text(json.dumps({"what": "projected images"}))
    before = _bytes(run_copy)
    for cmd in (["train", *FAST, "--train.epochs=3", f"--log.run_dir={run_copy}", "--resume"],
                ["eval", "--run", str(run_copy)], ["export", "--run", str(run_copy), "--out", str(tmp_path / "x")]):
        out = run_cli_in_process(*cmd)
        assert_refused(out, [str(run_copy / "outside_data.json"), "projected images"], [], tmp_path, code=2)
    assert _bytes(run_copy) == before and not (tmp_path / "x").exists()
    out = run_cli("train", *FAST, "--train.epochs=1", f"--log.run_dir={run_copy}", "--overwrite")
    assert out.returncode == 0 and not (run_copy / "outside_data.json").exists(), out.stderr[-2000:]


@pytest.mark.parametrize("recipe", [False, True], ids=["other-toml", "own-recipe"])
@pytest.mark.parametrize("flag", [[], ["--overwrite"], ["--resume"]])
def test_a_folder_whose_run_files_no_pst_dist_run_wrote_is_neither_replaced_nor_resumed(tmp_path, flag, recipe):
    """A user's folder holding files named as a run's (their own config.toml, summary.json, tb/): --overwrite
    would remove them, so every way in is refused, naming the files, and nothing in it changes. ``recipe``: their
    config.toml is a pst-dist recipe with every table a run records (it was taken for a run's, and --overwrite
    replaced it)."""
    mine = tmp_path / "mine"
    (mine / "tb").mkdir(parents=True)
    text = dump_toml(load_config(None, FAST)) + "# my notes\n"
    (mine / "config.toml").write_text(text if recipe else "[tool.black]\nline-length = 100\n")
    (mine / "summary.json").write_text('{"mine": true}')
    (mine / "tb" / "notes.txt").write_text("a user's own notes\n")
    def files() -> dict:
        return {p: p.read_bytes() for p in mine.rglob("*") if p.is_file()}

    before = files()
    out = run_cli_in_process("train", *FAST, f"--log.run_dir={mine}", *flag)
    assert_refused(out, [str(mine), "config.toml, summary.json", "no pst-dist run wrote them"], [], tmp_path, code=2)
    assert files() == before and len(before) == 3


@pytest.mark.parametrize("names,trackers", [(["meta.json"], []), (["tb/events.mine"], []),
                                            (["nodes.jsonl", "trackers.json"], []),
                                            (["wandb/my-run.txt"], ['--log.trackers=["wandb"]']),
                                            (["mlruns/0/meta.yaml"], ['--log.trackers=["mlflow"]'])])
@pytest.mark.parametrize("flag", [[], ["--overwrite"]])
def test_a_folder_with_files_named_as_a_run_writes_them_but_no_run_is_refused(tmp_path, names, trackers, flag):
    """Files a run writes besides its markers (meta.json, tb/, the folder of a tracker it logs to) in a folder no run
    wrote: a new run would write over them and a later --overwrite remove them, so the folder is refused, naming
    them."""
    mine = tmp_path / "mine"
    for n in names:
        (mine / n).parent.mkdir(parents=True, exist_ok=True)
        (mine / n).write_text(f"a user's own {n}\n")
    before = {p: p.read_bytes() for p in mine.rglob("*") if p.is_file()}
    out = run_cli_in_process("train", *FAST, f"--log.run_dir={mine}", *trackers, *flag)
    assert_refused(out, [str(mine), names[0].split("/")[0], "no pst-dist run wrote them"], [], tmp_path, code=2)
    assert {p: p.read_bytes() for p in mine.rglob("*") if p.is_file()} == before


def test_a_tracker_folder_the_run_does_not_log_to_is_left_to_its_owner(tmp_path):
    """A wandb/ of the user's own where the run logs to no tracker: the run goes in beside it, and --overwrite later
    leaves it (only a tracker run trackers.json records is the run's)."""
    mine = tmp_path / "mine"
    (mine / "wandb").mkdir(parents=True)
    (mine / "wandb" / "my-run.txt").write_text("mine\n")
    for flag in ([], ["--overwrite"]):
        out = run_cli_in_process("train", *FAST, "--train.epochs=1", f"--log.run_dir={mine}", *flag)
        assert out.returncode == 0, out.stderr[-2000:]
    assert (mine / "wandb" / "my-run.txt").read_text() == "mine\n"


def test_an_overwrite_killed_part_way_can_be_done_again(run_copy):
    """--overwrite removes the run's files with config.toml (what says they are a run's) last: a kill part-way
    leaves a directory the next --overwrite still knows as a run's."""
    for name in ("checkpoint.pt", "summary.json", "metrics.jsonl"):  # as a kill after these, before config.toml
        (run_copy / name).unlink()
    out = run_cli_in_process("train", *FAST, "--train.epochs=1", f"--log.run_dir={run_copy}", "--overwrite")
    assert out.returncode == 0, out.stderr[-2000:]
    from pst_dist.rundir import RUN_FILES, remove_run_files

    order = []
    real_rmtree, real_unlink = shutil.rmtree, Path.unlink
    try:
        shutil.rmtree = lambda p, *a, **k: (order.append(Path(p).name), real_rmtree(p, *a, **k))[1]
        Path.unlink = lambda p, *a, **k: (order.append(p.name), real_unlink(p, *a, **k))[1]
        remove_run_files(run_copy)
    finally:
        shutil.rmtree, Path.unlink = real_rmtree, real_unlink
    assert order[-1] == "config.toml" and set(order) <= set(RUN_FILES), order


@pytest.mark.parametrize("value", ["", " "])
def test_an_empty_run_dir_is_refused(tmp_path, value, monkeypatch):
    marker = place_marker(tmp_path)
    monkeypatch.chdir(tmp_path)  # where a run dir of "" or " " would land
    out = run_cli_in_process("train", *FAST, f"--log.run_dir={value}")
    assert_refused(out, "log.run_dir", [marker], tmp_path, code=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["USER_FILE.txt"]


@pytest.mark.parametrize("override,key", [
    ("--train.lr=0.05", "train.lr: 0.1 -> 0.05"),
    ("--poison.kind=classwise_noise", "poison.kind: 'none' -> 'classwise_noise'"),
    ("--data.img_size=24", "data.img_size: 16 -> 24"),
    ("--train.seed=1", "train.seed: 0 -> 1"),
    ("--train.optimizer=adamw", "train.optimizer: 'sgd' -> 'adamw'"),
    ("--train.epochs=1", "train.epochs=1 is fewer than the run's recorded 2"),
])
def test_resume_refuses_a_changed_config_naming_the_key(run_copy, tmp_path, override, key):
    marker = place_marker(tmp_path)
    before = _bytes(run_copy)
    out = run_cli_in_process("train", *FAST, f"--log.run_dir={run_copy}", "--resume", override)
    assert_refused(out, ["--resume", key], [marker], tmp_path, code=2)
    assert _bytes(run_copy) == before, "a refused resume must not rewrite config.toml or anything else"


def test_resume_with_more_epochs_is_recorded_and_metrics_hold_each_epoch_once(run_copy):
    with open(run_copy / "metrics.jsonl", "a") as f:  # an epoch logged after the checkpoint, then killed
        f.write(json.dumps({"step": 10_000, "epoch": 3, "train/loss": 1.0}) + "\n")
    out = run_cli("train", *FAST, f"--log.run_dir={run_copy}", "--resume", "--train.epochs=3",
                  "--log.progress=true", "--train.threads=1")
    assert out.returncode == 0, out.stderr[-3000:]
    meta = json.loads((run_copy / "meta.json").read_text())
    (resume,) = meta["resumes"]
    assert resume["epoch"] == 2 and resume["changes"]["train.epochs"] == [2, 3]
    assert resume["changes"]["log.progress"] == [False, True]
    assert load_config(run_copy / "config.toml").train.epochs == 3
    assert _epochs(run_copy) == [1, 2, 3]


@pytest.mark.parametrize("override,named", [("--train.lr=inf", "train.lr=inf"), ("--train.lr=nan", "train.lr=nan"),
                                            ("--poison.eps=-inf", "poison.eps=-inf")])
def test_non_finite_config_numbers_are_config_errors(tmp_path, override, named):
    """(nan was refused for a reason it did not have: "TOML reads only part of the value (a '#' ...)")"""
    with pytest.raises(ConfigError, match=named.replace(".", r"\.") + ": expected a finite number"):
        load_config(None, [override])
    if override == "--train.lr=inf":  # and through the CLI, once
        marker = place_marker(tmp_path)
        out = run_cli_in_process("train", *FAST, override, f"--log.run_dir={tmp_path / 'r'}")
        assert_refused(out, named, [marker], tmp_path, code=2)
        assert not (tmp_path / "r").exists()


def test_a_diverging_run_stops_keeps_its_last_checkpoint_and_report_marks_it_failed(tmp_path):
    run_dir = tmp_path / "runs" / "diverge_seed0"
    marker = place_marker(tmp_path)
    # epoch 1 at lr 1e6 x 1e-9 (trains), epoch 2 at lr 1e6 (diverges)
    stages = '--schedule.stages=[{name="calm",epochs=1,lr_mult=1e-9},{name="wild"}]'
    out = run_cli("train", *FAST, "--train.lr=1e6", "--train.lr_schedule=constant", stages,
                  f"--log.run_dir={run_dir}")
    assert_refused(out, ["non-finite", "epoch 2", "train.lr=1000000.0", "last good checkpoint (epoch 1)"],
                   [marker], tmp_path, code=3)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "failed" and "non-finite" in summary["error"]
    import torch

    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert ckpt["state"]["epoch"] == 1
    assert all(bool(torch.isfinite(v).all()) for v in ckpt["model"].values() if v.is_floating_point())
    rep = run_cli("report", tmp_path / "runs")
    assert rep.returncode == 0 and "diverge_seed0: FAILED: non-finite" in rep.stdout, rep.stdout + rep.stderr
    assert "| diverge |" not in rep.stdout, "a failed run must not be averaged into the table"


def _drop(key):
    return lambda ck: {k: v for k, v in ck.items() if k != key}


@pytest.mark.parametrize("change,names", [
    (_drop("optimizer"), ["checkpoint.pt", "missing optimizer"]),
    (_drop("rng_torch"), ["checkpoint.pt", "missing rng_torch"]),
    (lambda ck: {**ck, "state": {**ck["state"], "step": "ten"}}, ["step 'ten'"]),
    (lambda ck: {**ck, "state": {k: v for k, v in ck["state"].items() if k != "history"}}, ["trainer state",
                                                                                            "history"]),
    (lambda ck: {**ck, "optimizer": {"state": {}, "param_groups": []}}, ["optimizer state does not fit"]),
    (lambda ck: {**ck, "rng_torch": torch.zeros(3)}, ["random-number state cannot be restored"]),
])
def test_resume_from_a_partial_or_foreign_checkpoint_is_one_clear_error(run_copy, tmp_path, change, names):
    """A checkpoint.pt that is not all pst-dist writes (keys missing, another optimizer, a bad RNG state or trainer
    state) is refused naming what is wrong, not a traceback; nothing in the run changes but the file itself."""
    f = run_copy / "checkpoint.pt"
    torch.save(change(torch.load(f, weights_only=True)), f)
    before = _bytes(run_copy)
    out = run_cli_in_process("train", *FAST, f"--log.run_dir={run_copy}", "--resume", "--train.epochs=3")
    assert_refused(out, names, [], tmp_path, code=2)
    assert _bytes(run_copy) == before


def test_a_batch_larger_than_the_training_set_is_refused_before_anything_is_written(tmp_path):
    marker = place_marker(tmp_path)
    out = run_cli_in_process("train", *FAST, "--train.batch_size=1000", f"--log.run_dir={tmp_path / 'r'}")
    assert_refused(out, ["train.batch_size=1000", "256 training images"], [marker], tmp_path, code=2)
    assert not (tmp_path / "r").exists()


def test_ctrl_c_is_one_line_and_keeps_the_last_checkpoint(tmp_path):
    run_dir = tmp_path / "r"
    marker = place_marker(tmp_path)
    # SIGINT at its default in the child: a test run started in the background (nohup ... &) ignores it, and the
    # child would inherit that and train all 200 epochs
    out = signal_after_checkpoint([*FAST, "--train.epochs=200", f"--log.run_dir={run_dir}"], run_dir, signal.SIGINT,
                                  preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert_refused(out, ["interrupted", "--resume"], [marker], tmp_path, code=130)
    assert len(out.stderr.strip().splitlines()) <= 2, out.stderr
    import torch

    assert torch.load(run_dir / "checkpoint.pt", weights_only=True)["state"]["epoch"] >= 1


@pytest.mark.parametrize("kind", ["file", "under_a_file"])
def test_a_run_dir_that_cannot_be_a_directory_is_refused(tmp_path, kind):
    blocker = tmp_path / "blocker"
    blocker.write_text("a user's file\n")
    run_dir = blocker if kind == "file" else blocker / "run"
    marker = place_marker(tmp_path)
    out = run_cli_in_process("train", *FAST, f"--log.run_dir={run_dir}")
    assert_refused(out, [str(run_dir)], [marker], tmp_path, code=2)
    assert blocker.read_text() == "a user's file\n"


def _limit_file_size(limit: int):
    def apply() -> None:  # in the child: writes past `limit` bytes fail with EFBIG, as on a full disk
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_a_full_disk_while_checkpointing_keeps_the_last_checkpoint_and_no_temp_file(run_copy, tmp_path):
    marker = place_marker(tmp_path)
    before = (run_copy / "checkpoint.pt").read_bytes()
    assert len(before) > 300_000
    proc = subprocess.run([sys.executable, "-m", "pst_dist.cli", "train", *FAST, f"--log.run_dir={run_copy}",
                           "--resume", "--train.epochs=3"], capture_output=True, text=True, timeout=600,
                          preexec_fn=_limit_file_size(200_000))
    assert_refused(proc, ["File too large", "checkpoint.pt"], [marker], tmp_path, code=1)
    assert (run_copy / "checkpoint.pt").read_bytes() == before


def test_a_run_dir_with_characters_toml_must_escape_round_trips_and_resumes(tmp_path):
    run_dir = tmp_path / 'q"uo\\te d\tir\x7f \u00e9\U0001f600'
    out = run_cli("train", *FAST, "--train.epochs=1", f"--log.run_dir={run_dir}")
    assert out.returncode == 0, out.stderr[-3000:]
    cfg = load_config(run_dir / "config.toml")
    assert cfg.log.run_dir == str(run_dir)
    assert dump_toml(cfg) == (run_dir / "config.toml").read_text(encoding="utf-8")
    again = run_cli("train", *FAST, "--train.epochs=2", f"--log.run_dir={run_dir}", "--resume")
    assert again.returncode == 0, again.stderr[-3000:]


def test_a_run_dir_of_bytes_that_are_not_utf8_is_refused(tmp_path):
    marker = place_marker(tmp_path)
    bad = os.fsdecode(bytes(tmp_path) + b"/run\xff")
    out = run_cli_in_process("train", *FAST, f"--log.run_dir={bad}")
    assert_refused(out, ["log.run_dir", "not UTF-8"], [marker], tmp_path, code=2)


def test_overwrite_touches_nothing_in_a_directory_without_a_run(tmp_path):
    from pst_dist.rundir import remove_run_files

    (tmp_path / "tb").mkdir()
    (tmp_path / "tb" / "events").write_text("a user's own TensorBoard folder\n")
    (tmp_path / "meta.json").write_text("{}")
    assert remove_run_files(tmp_path) == []
    assert (tmp_path / "tb" / "events").is_file() and (tmp_path / "meta.json").read_text() == "{}"


def test_a_run_cut_short_before_its_config_toml_is_still_a_run_to_overwrite(tmp_path):
    # the header writes meta.json first: a disk full or a kill before config.toml leaves a run's meta.json alone,
    # which --overwrite replaces (a user's own config.toml without a run's meta.json is refused: test above)
    run = tmp_path / "run"
    assert run_cli_in_process("train", *FAST, "--train.epochs=1", f"--log.run_dir={run}").returncode == 0
    for name in os.listdir(run):
        if name != "meta.json":
            shutil.rmtree(run / name) if (run / name).is_dir() else (run / name).unlink()
    out = run_cli_in_process("train", *FAST, "--train.epochs=1", f"--log.run_dir={run}", "--overwrite")
    assert out.returncode == 0, out.stderr[-2000:]
    assert (run / "config.toml").is_file() and (run / "checkpoint.pt").is_file()


def test_a_resume_on_another_device_type_compares_auto_by_what_it_meant_where_the_run_trained(tmp_path):
    # 'auto' was judged on this machine for both sides: a GPU run (not deterministic, channels-last) resumed on the
    # CPU showed no change, and trained on deterministic and channels-first unrecorded
    run = tmp_path / "run"
    assert run_cli_in_process("train", *FAST, "--train.epochs=1", f"--log.run_dir={run}").returncode == 0
    meta = json.loads((run / "meta.json").read_text())
    meta["resolved"]["device"] = "cuda:0"  # as a GPU machine records it
    (run / "meta.json").write_text(json.dumps(meta))
    out = run_cli_in_process("train", *FAST, "--train.epochs=2", f"--log.run_dir={run}", "--resume")
    assert out.returncode == 2 and "train.deterministic: False -> True" in out.stderr, out.stderr[-2000:]
    assert "train.channels_last: True -> False" in out.stderr


def test_relative_paths_are_recorded_as_what_they_named_and_a_resume_elsewhere_needs_the_same_poison(tmp_path):
    """`pst-dist train` records poison.path (and data.root) absolute: the record names the files that trained the
    run, whatever directory reads it. From another working directory the same relative path names another store:
    the resume is refused (the poison's recorded fingerprint differs), naming the path, before it writes anything.
    The same poison copied there is the run's own: the resume goes on, config.toml naming the copy. A run recorded
    before (a relative path) resumes from where it ran."""
    a, b = tmp_path / "a", tmp_path / "b"
    for where, seed in ((a, 0), (b, 1)):
        where.mkdir()
        made = run_cli("poison", "--out", "p", *TINY, "--data.val_from=test", "--poison.kind=classwise_noise",
                       f"--poison.seed={seed}", cwd=where)
        assert made.returncode == 0, made.stderr[-2000:]
    run = tmp_path / "run"
    args = [*FAST, "--data.val_from=test", "--poison.kind=file", "--poison.path=p", f"--log.run_dir={run}",
            "--train.threads=1"]
    out = run_cli("train", *args, "--train.epochs=1", cwd=a)
    assert out.returncode == 0, out.stderr[-2000:]
    assert load_config(run / "config.toml", recorded=True).poison.path == str(a / "p")
    before = _bytes(run)
    out = run_cli("train", *args, "--train.epochs=2", "--resume", cwd=b)
    assert out.returncode == 2 and f"[resume] poison.path moved: '{a / 'p'}' -> '{b / 'p'}'" in out.stderr
    said = f"the poison read from {b / 'p'} is not the one the run in {run} started on"
    assert said in out.stderr, out.stderr[-2000:]
    assert _bytes(run) == before
    shutil.rmtree(b / "p")
    shutil.copytree(a / "p", b / "p")
    moved = run_cli("train", *args, "--train.epochs=2", "--resume", cwd=b)
    assert moved.returncode == 0, moved.stderr[-2000:]
    assert load_config(run / "config.toml", recorded=True).poison.path == str(b / "p")
    shutil.rmtree(run)
    assert run_cli("train", *args, "--train.epochs=1", cwd=a).returncode == 0
    text = (run / "config.toml").read_text()
    (run / "config.toml").write_text(text.replace(f'path = "{a / "p"}"', 'path = "p"'))  # as recorded before
    out = run_cli("train", *args, "--train.epochs=2", "--resume", cwd=a)
    assert out.returncode == 0, out.stderr[-2000:]
    assert load_config(run / "config.toml", recorded=True).poison.path == str(a / "p")


def test_a_source_that_records_nothing_of_its_files_keeps_its_data_root(tmp_path):
    """Fashion-MNIST's IDX files (like CIFAR's batches) leave no record of what they held, so nothing could check
    that another data.root holds the same: that resume stays refused, saying which paths may move and why."""
    source = Path("/usr/share/datasets/fashion-mnist")
    if not source.is_dir():
        pytest.skip("dataset-fashion-mnist not installed")
    first, other, run = tmp_path / "fm", tmp_path / "fm2", tmp_path / "run"
    for d in (first, other):
        d.mkdir()
        for f in source.iterdir():
            (d / f.name).symlink_to(f)
    args = ["--data.source=fashion-mnist", "--data.train_size=256", "--data.val_size=64", "--data.test_size=64",
            "--data.probe_size=64", "--model.width=0.125", "--train.batch_size=32", "--log.progress=false",
            "--log.tensorboard=false", f"--log.run_dir={run}"]
    assert run_cli_in_process("train", *args, "--train.epochs=1", f"--data.root={first}").returncode == 0
    before = _bytes(run)
    out = run_cli_in_process("train", *args, "--train.epochs=2", f"--data.root={other}", "--resume")
    assert_refused(out, [f"(data.root: '{first}' -> '{other}')", "data.root may name another path only where the "
                         "run recorded what the path held: .beton files, a poison read from files",
                         "this run's record does not"], [], tmp_path, code=2)
    assert _bytes(run) == before


def test_a_checkpoint_a_weights_only_load_refuses_is_one_line_without_torch_s_advice_to_load_it_unrestricted(
        run_copy, tmp_path):
    """Text where checkpoint.pt should be, and a pickle that calls os.system: one line naming the file and torch's
    reason, for resume, eval and export alike; never torch's advice to set weights_only=False (which would run the
    file's code), nor its seven lines."""
    f = run_copy / "checkpoint.pt"
    for content, reason in ((b"not a checkpoint\n", "Unsupported operand"), (None, "posix.system")):
        if content is None:
            torch.save({"model": os.system}, f)
        else:
            f.write_bytes(content)
        for cmd in (["train", *FAST, f"--log.run_dir={run_copy}", "--resume", "--train.epochs=3"],
                    ["eval", "--run", str(run_copy)], ["export", "--run", str(run_copy), "--out", str(tmp_path / "x")]):
            out = run_cli_in_process(*cmd)
            assert_refused(out, [f"{f}: not a readable pst-dist checkpoint (a weights-only load refuses it: ",
                                 reason], [], tmp_path, code=2)
            said = out.stderr[out.stderr.index("pst-dist: "):]
            assert "set to `False`" not in said and len(said.strip().splitlines()) == 1, said


@pytest.mark.parametrize("cut", [False, True], ids=["garbled", "cut-at-a-line"])
@pytest.mark.parametrize("flag", ["--resume", "--overwrite"])
def test_a_run_whose_config_toml_was_damaged_is_named_as_such(run_copy, tmp_path, flag, cut):
    """Was: "no pst-dist run wrote them". Still refused both ways (its record cannot be read), nothing changed."""
    f = run_copy / "config.toml"
    text = f.read_text()
    f.write_text(text[:text.index("[log]")] if cut else text + "garbage [\n")
    before = _bytes(run_copy)
    out = run_cli_in_process("train", *FAST, f"--log.run_dir={run_copy}", flag, "--train.epochs=3")
    how = "no [log] table: cut short?" if cut else "not valid TOML: "
    assert_refused(out, [f"holds a pst-dist run whose config.toml is damaged ({how}", "restore config.toml"],
                   [], tmp_path, code=2)
    assert _bytes(run_copy) == before


def test_a_run_killed_before_its_first_checkpoint_resumes_from_scratch_as_an_uninterrupted_run(tmp_path):
    """A preemption wrapper re-launches with --resume: a run killed (SIGKILL) before it wrote a checkpoint starts
    again from epoch 0 (was: refused, "no checkpoint to resume from", while a plain rerun pointed at --resume) and
    ends as the same run uninterrupted would; one that had a checkpoint, since removed, is not started again."""
    args = [*FAST, "--train.epochs=3", "--train.checkpoint_every=3"]
    run_dir = tmp_path / "r"
    proc = subprocess.Popen([sys.executable, "-m", "pst_dist.cli", "train", *args, f"--log.run_dir={run_dir}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    import time

    deadline = time.time() + 240
    while proc.poll() is None and time.time() < deadline and not (
            (run_dir / "metrics.jsonl").is_file() and '"epoch"' in (run_dir / "metrics.jsonl").read_text()):
        time.sleep(0.05)
    proc.kill()  # in its second epoch: its only checkpoint comes at the end of the third
    proc.wait(timeout=60)
    assert (run_dir / "config.toml").is_file() and not (run_dir / "checkpoint.pt").exists(), "killed too late"
    out = run_cli("train", *args, f"--log.run_dir={run_dir}", "--resume")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "stopped before its first checkpoint, so nothing to resume from; starting it again from epoch 0" \
        in out.stderr
    assert _epochs(run_dir) == [1, 2, 3]  # the killed attempt's lines went with its other files
    meta = json.loads((run_dir / "meta.json").read_text())
    assert not meta.get("resumes"), "a run started again is one segment"
    whole = tmp_path / "whole"
    assert run_cli("train", *args, f"--log.run_dir={whole}").returncode == 0
    for key in ("final_test_acc", "final_val_acc", "model_checksum"):
        assert json.loads((run_dir / "summary.json").read_text())[key] == \
            json.loads((whole / "summary.json").read_text())[key], key
    (whole / "checkpoint.pt").unlink()  # a finished run whose checkpoint was removed: its results stay
    before = _bytes_but(whole, "checkpoint.pt")
    r = run_cli_in_process("train", *args, "--train.epochs=4", f"--log.run_dir={whole}", "--resume")
    assert r.returncode == 2 and "holds no checkpoint, but had one (it ended (summary.json)): removed?" \
        in r.stderr, r.stderr[-2000:]
    assert _bytes_but(whole, "checkpoint.pt") == before
    # and no summary: as a run killed while it saved its first checkpoint leaves it (the epoch's metrics are
    # logged just before): nothing to resume from, started again
    (whole / "summary.json").unlink()
    r = run_cli("train", *args, f"--log.run_dir={whole}", "--resume")  # its own process, as run_dir's ran
    assert r.returncode == 0 and "starting it again from epoch 0" in r.stderr, r.stderr[-2000:]
    assert json.loads((whole / "summary.json").read_text())["model_checksum"] == \
        json.loads((run_dir / "summary.json").read_text())["model_checksum"]
    # an epoch logged after the first checkpoint's: that save completed, so the checkpoint was removed since
    late = tmp_path / "late"
    assert run_cli_in_process("train", *FAST, "--train.epochs=2", "--train.checkpoint_every=1",
                              f"--log.run_dir={late}").returncode == 0
    (late / "checkpoint.pt").unlink()
    (late / "summary.json").unlink()
    before = _bytes_but(late, "checkpoint.pt")
    r = run_cli_in_process("train", *FAST, "--train.epochs=2", "--train.checkpoint_every=1",
                           f"--log.run_dir={late}", "--resume=auto")
    assert r.returncode == 2 and "had one (its metrics.jsonl logs epoch 2, after its first checkpoint's (epoch 1))" \
        in r.stderr, r.stderr[-2000:]
    assert _bytes_but(late, "checkpoint.pt") == before


def test_resume_auto_starts_a_run_that_is_not_there_and_continues_one_that_is(tmp_path):
    """A job that may be preempted is launched with one command, --resume=auto: it starts the run when log.run_dir
    holds none, continues it when it does (under the same config check as --resume), and never replaces it."""
    run_dir = tmp_path / "r"
    first = run_cli_in_process("train", *FAST, "--train.epochs=2", f"--log.run_dir={run_dir}", "--resume=auto")
    assert first.returncode == 0, first.stderr[-3000:]
    assert "--resume=auto: " in first.stderr and "holds no run; starting it" in first.stderr
    assert _epochs(run_dir) == [1, 2] and not json.loads((run_dir / "meta.json").read_text()).get("resumes")
    again = run_cli_in_process("train", *FAST, "--train.epochs=3", f"--log.run_dir={run_dir}", "--resume=auto")
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"[resume] {run_dir} from epoch 2, to train.epochs=3" in again.stderr
    assert _epochs(run_dir) == [1, 2, 3]
    assert [m["epoch"] for m in json.loads((run_dir / "meta.json").read_text())["resumes"]] == [2]
    # ended: launched again, it trains nothing, and its summary keeps the throughput it measured
    measured = json.loads((run_dir / "summary.json").read_text())["throughput"]
    assert measured["epochs_timed"] == 1 and measured["img_per_s"] > 0
    ended = run_cli_in_process("train", *FAST, "--train.epochs=3", f"--log.run_dir={run_dir}", "--resume=auto")
    assert ended.returncode == 0 and _epochs(run_dir) == [1, 2, 3], ended.stderr[-3000:]
    assert json.loads((run_dir / "summary.json").read_text())["throughput"] == measured
    before = _bytes(run_dir)
    other = run_cli_in_process("train", *FAST, "--train.epochs=3", "--train.lr=0.2", f"--log.run_dir={run_dir}",
                               "--resume=auto")
    assert other.returncode == 2 and "--resume: the config differs from the one" in other.stderr, other.stderr
    both = run_cli_in_process("train", *FAST, f"--log.run_dir={tmp_path / 'new'}", "--resume=auto", "--overwrite")
    assert both.returncode == 2 and "--resume=auto and --overwrite together" in both.stderr, both.stderr
    bad = run_cli("train", *FAST, f"--log.run_dir={run_dir}", "--resume=yes")
    assert bad.returncode == 2 and "argument --resume: ignored explicit argument 'yes'" in bad.stderr, bad.stderr
    spaced = run_cli_in_process("train", *FAST, f"--log.run_dir={run_dir}", "--resume", "auto")
    assert spaced.returncode == 2 and "'auto': overrides look like --section.key=value (resume-or-start is " \
        "--resume=auto, one word)" in spaced.stderr, spaced.stderr[-2000:]
    other = run_cli_in_process("show-config", *FAST, "auto")  # a command without --resume=auto: no hint
    assert other.returncode == 2 and "'auto': overrides look like --section.key=value" in other.stderr \
        and "--resume=auto" not in other.stderr, other.stderr[-2000:]
    # an override with a space right after --resume is an override, not a value of --resume
    spaced = run_cli_in_process("train", *FAST, "--train.epochs=3", f"--log.run_dir={run_dir}", "--resume",
                                '--log.trackers=["x", "y"]')
    assert spaced.returncode == 2 and "log.trackers=['x', 'y']: expected" in spaced.stderr, spaced.stderr[-2000:]
    assert _bytes(run_dir) == before and not (tmp_path / "new").exists()


def _bytes_but(run_dir: Path, gone: str) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file() and p.name != gone}


def test_a_resume_removes_the_temporary_files_of_a_killed_save_and_only_those(run_copy):
    """A segment killed while it saved its checkpoint leaves a hidden checkpoint-sized temporary (GBs for a large
    model): the next --resume removes it, named, when it is this machine's and its process is gone; one of another
    machine (a shared file system), of a running process, or of a name a run does not write stays."""
    from pst_dist.io import _machine, stale_leftovers

    host, dead = _machine(), dead_pid()  # this machine, as pst-dist names it
    stale = [f".checkpoint.pt.tmp-{host}-{dead}", f".config.toml.tmp-{host}-{dead}"]
    kept = [f".checkpoint.pt.tmp-elsewhere-{dead}", f".checkpoint.pt.tmp-{host}-{os.getpid()}",
            f".notes.txt.tmp-{host}-{dead}", "notes.txt"]
    for name in stale + kept:
        (run_copy / name).write_text("partial\n")
    assert [p.name for p in stale_leftovers(run_copy, ["checkpoint.pt", "config.toml"], "tmp")] == sorted(stale)
    out = run_cli("train", *FAST, f"--log.run_dir={run_copy}", "--resume", "--train.epochs=3")
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"removed {', '.join(sorted(stale))} from {run_copy}: left by a write that was killed" in out.stderr
    assert not any((run_copy / n).exists() for n in stale)
    assert all((run_copy / n).read_text() == "partial\n" for n in kept)


def test_a_deepspeed_run_whose_latest_was_lost_is_not_started_again(tmp_path):
    """Two tag folders and no 'latest' (written once a save is complete and on disk; lost since): an earlier
    save completed, so --resume does not start the run again over its checkpoints; one tag folder alone is a first
    save cut short, and it does."""
    from pst_dist.rundir import RunDirError, resume_from_scratch

    run = tmp_path / "run"
    (run / "ds_checkpoint" / "step8").mkdir(parents=True)
    assert resume_from_scratch(run)
    (run / "ds_checkpoint" / "step16").mkdir()
    with pytest.raises(RunDirError, match=r"holds step8, step16 but its 'latest' names none"):
        resume_from_scratch(run)
    assert sorted(p.name for p in (run / "ds_checkpoint").iterdir()) == ["step16", "step8"]


# ---------------------------------------------------------------------------------------------------------------
# one process trains into a run directory at a time


def test_a_second_training_of_a_run_directory_is_refused_while_the_first_runs_and_goes_on_once_it_was_killed(
        tmp_path, capfd, monkeypatch):
    """A queue script started twice, or a job launched again while its first launch still runs: both trained into
    one run directory, writing their checkpoints and metrics over each other's. The second waits LOCK_WAIT_S for the
    first's lock, then is refused naming it; once the first is killed (SIGKILL: the kernel lets its lock go, its file
    stays) the next launch says so and continues the run, and a run that ends removes its lock file."""
    import time

    from pst_dist import rundir
    from pst_dist.rundir import LOCK
    from pst_dist.train import train

    from .conftest import started

    monkeypatch.setattr(rundir, "LOCK_WAIT_S", 1.0)
    run_dir, marker = tmp_path / "run", f"--log.run_dir={tmp_path / 'run'}"
    args = [*FAST, "--train.epochs=400", marker]
    with started([sys.executable, "-m", "pst_dist.cli", "train", *args], marker) as (first, _):
        deadline = time.time() + 120
        while not (run_dir / "checkpoint.pt").exists() and first.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        assert (run_dir / "checkpoint.pt").exists(), "the first run saved no checkpoint in 120 s"
        held = json.loads((run_dir / LOCK).read_text())
        assert held["pid"] == first.pid and first.poll() is None
        t0 = time.monotonic()
        second = run_cli_in_process("train", *args, "--resume=auto")
        assert time.monotonic() - t0 >= 1.0, "refused without waiting for the lock"
        assert_refused(second, names=[f"log.run_dir={str(run_dir)!r}: process {first.pid} on this machine is "
                                      f"training into it", "choose another log.run_dir"], code=2)
        assert f"is held by process {first.pid} on this machine: waiting up to 1 s" in second.stderr
        first.kill()
        first.wait()
    assert json.loads((run_dir / LOCK).read_text()) == held, "a killed holder's lock file stays"
    logged = _epochs(run_dir)[-1]
    capfd.readouterr()
    summary = train(load_config(None, args), resume="auto", stop_after_epochs=logged + 1)
    assert f"process {first.pid} on this machine held it until it was killed (it no longer runs); taken over" \
        in capfd.readouterr().err
    assert summary["status"] == "finished" and _epochs(run_dir)[-1] == logged + 1
    assert not (run_dir / LOCK).exists()


def test_a_lock_let_go_while_another_process_waits_is_taken_from_its_path_again_and_another_s_is_waited_for(
        tmp_path, monkeypatch):
    """The holder removes the lock file while it holds it, then lets it go: a process that was waiting on the
    removed file must not take that one (a third may have made a new file at the path meanwhile), but open the path
    again. Another process's lock (a child holding it, its file naming another machine) is waited for and refused,
    and taken once its process has let it go."""
    from pst_dist import rundir
    from pst_dist.rundir import LOCK, RunDirError, RunLock

    run_dir = tmp_path / "run"
    first = RunLock(run_dir, log=lambda m: None)
    said: list[str] = []
    opened: list[int] = []
    real_open = os.open

    def let_go_meanwhile(path, *a):  # the holder removes its file and lets go between the second's open and lock
        fd = real_open(path, *a)
        opened.append(fd)
        if len(opened) == 1:
            first.release()
        return fd

    monkeypatch.setattr(rundir.os, "open", let_go_meanwhile)
    second = RunLock(run_dir, log=said.append)
    monkeypatch.undo()
    assert len(opened) == 2, "took the removed file instead of opening the path again"
    assert second.fd is not None and os.fstat(second.fd).st_ino == (run_dir / LOCK).stat().st_ino and said == []
    assert json.loads((run_dir / LOCK).read_text())["pid"] == os.getpid()
    second.release()
    with lock_held_elsewhere(run_dir / LOCK):
        monkeypatch.setattr(rundir, "LOCK_WAIT_S", 0.5)
        with pytest.raises(RunDirError, match="process 4242 on elsewhere\\+1 is training into it"):
            RunLock(run_dir, log=lambda m: None)
    said.clear()
    lock = RunLock(run_dir, log=said.append)  # let go with its process; its file stays
    assert said == [f"[run] {run_dir / LOCK}: process 4242 on elsewhere+1 held it until it was killed (it no longer "
                    f"runs); taken over"]
    lock.release()
    assert not (run_dir / LOCK).exists() and run_dir.is_dir()  # a folder this lock did not make stays


def test_a_lock_lets_go_only_of_its_own_file_and_a_file_system_without_locks_leaves_another_s_file(
        tmp_path, monkeypatch):
    """A run directory moved while it trains (mv, the bench's rename of a finished cell): a new launch locks a new
    file at the old path, which the first run's release must not remove. A file system that gives no locks
    (ENOLCK) runs unlocked, saying so, and leaves the file there (another process's). A lock this process still
    holds (an interrupted run's) is let go before the next run of that directory takes it."""
    import errno
    import fcntl

    from pst_dist import rundir
    from pst_dist.rundir import LOCK, RunLock

    first = RunLock(tmp_path / "run", log=lambda m: None)
    (tmp_path / "run").rename(tmp_path / "moved")
    second = RunLock(tmp_path / "run", log=lambda m: None)
    first.release()
    assert (tmp_path / "run" / LOCK).exists() and (tmp_path / "moved" / LOCK).exists()  # each where it is
    assert json.loads((tmp_path / "run" / LOCK).read_text())["pid"] == os.getpid()
    said: list[str] = []

    def no_locks(fd, how):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    third = RunLock(tmp_path / "run", log=said.append)
    monkeypatch.undo()
    assert third.fd is None and "the file system gives no file locks (No locks available)" in said[0]
    assert (tmp_path / "run" / LOCK).exists(), "removed another process's lock file"
    second.release()
    assert not (tmp_path / "run" / LOCK).exists()
    rundir.lock_run_dir(tmp_path / "again")  # held, never let go (an interrupted run) ...
    rundir.lock_run_dir(tmp_path / "again")  # ... then taken again by the same process: no 30 s wait, no refusal
    pid = os.fork()  # a DataLoader worker forked while the run holds its lock lets go of its copy of it
    if pid == 0:
        os._exit(0 if rundir._HELD[str(tmp_path / "again")].fd is None else 1)
    assert os.waitpid(pid, 0)[1] == 0, "a forked child kept the run's lock"
    rundir.unlock_run_dir(tmp_path / "again")
    assert not (tmp_path / "again").exists() and not rundir._HELD


def test_a_run_that_fails_after_taking_its_lock_leaves_neither_the_lock_nor_the_folders_it_made(tmp_path):
    from pst_dist.rundir import LOCK

    run_dir = tmp_path / "a" / "b" / "run"
    out = run_cli_in_process("train", *FAST, f"--log.run_dir={run_dir}", "--data.source=imagefolder",
                             f"--data.root={tmp_path / 'no_such_folder'}")
    assert out.returncode != 0 and "no_such_folder" in out.stderr, out.stderr[-2000:]
    assert not (tmp_path / "a").exists() and not list(tmp_path.rglob(LOCK))
