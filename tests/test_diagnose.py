"""pst_dist.diagnose: the linear probe and k-means purity on a layer group's features, and `pst-dist diagnose`'s
per-group curves on poisoned and clean data."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def test_probe_and_clustering_tell_class_structure_from_noise():
    from pst_dist.diagnose import kmeans_purity, ridge_probe_accuracy

    g = torch.Generator().manual_seed(0)
    y = torch.arange(400) % 4
    centres = torch.randn(4, 16, generator=g) * 4
    separable = centres[y] + torch.randn(400, 16, generator=g)
    unrelated = torch.randn(400, 16, generator=g)
    assert ridge_probe_accuracy(separable, y, 4) > 0.95
    assert ridge_probe_accuracy(unrelated, y, 4) < 0.4
    assert kmeans_purity(separable, y, 4) > 0.95
    assert kmeans_purity(unrelated, y, 4) < 0.45


def test_diagnose_writes_per_group_curves_for_poisoned_and_clean(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "pst_dist.cli", "diagnose", "--config",
                        str(ROOT / "tests" / "configs" / "tune_tiny.toml"), "--out", str(tmp_path), "--standard",
                        "--deepspeed.enabled=false", "--train.epochs=2", "--probe-size=200", "--log.tensorboard=false"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in (tmp_path / "diagnose.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in rows] == [0, 1, 2]
    groups = {k.split("/")[1] for k in rows[0] if k.startswith("clean/")}
    assert len(groups) >= 3
    for row in rows:
        for which in ("poisoned", "clean"):
            for gname in groups:
                assert 0 <= row[f"{which}/{gname}/probe_acc"] <= 1 and 0 < row[f"{which}/{gname}/kmeans_purity"] <= 1
    # the poisoned probe is the poisoned images (not the clean ones twice): their features differ
    last = rows[-1]
    assert any(last[f"poisoned/{g}/{m}"] != last[f"clean/{g}/{m}"] for g in groups
               for m in ("probe_acc", "kmeans_purity")), last
    assert (tmp_path / "diagnose.png").stat().st_size > 1000


def test_diagnose_replaces_only_its_own_output_and_refuses_flags_it_would_ignore(tmp_path):
    """--overwrite replaces a diagnose output (one stopped before its first epoch included: an empty diagnose.jsonl,
    tb/, a run/ holding only its lock file), not a user's folder that merely holds a diagnose.jsonl and a tb/;
    --log.run_dir (it trains into --out/run) and --standard with --schedule.stages are refused, not silently
    dropped."""
    from .conftest import MARKER_TEXT, place_marker, run_cli_in_process

    cfg = ["diagnose", "--config", str(ROOT / "tests" / "configs" / "bench_tiny.toml"), "--poison.kind=patch_noise"]
    user = tmp_path / "user"
    (user / "tb").mkdir(parents=True)
    (user / "diagnose.jsonl").write_text("my notes\n")
    mine = place_marker(user / "tb" / "my_experiment.tfevents")
    r = run_cli_in_process(*cfg, "--out", str(user), "--overwrite")
    assert r.returncode == 2 and "not an earlier `pst-dist diagnose` output" in r.stderr, r.stderr[-2000:]
    assert mine.read_text() == MARKER_TEXT and (user / "diagnose.jsonl").read_text() == "my notes\n"
    for flags, says in ((["--log.run_dir=elsewhere"], "--log.run_dir given, but it trains into --out/run"),
                        (["--standard", '--schedule.stages=[{name="a"}]'], "--standard names the schedule")):
        r = run_cli_in_process(*cfg, "--out", str(tmp_path / "new"), *flags)
        assert r.returncode == 2 and says in r.stderr, r.stderr[-2000:]
    for flags, says in ((["--model.name=nomodel"], "model.name='nomodel': not a timm model"),  # (was: refused by
                        (['--schedule.stages=[{name="a",freeze=[9]}]'], "names group 9")):  # train(), after --out's
        r = run_cli_in_process(*cfg, "--out", str(tmp_path / "new"), *flags)           # first files)
        assert r.returncode == 2 and says in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "new").exists()
    stopped = tmp_path / "stopped"  # what a diagnose killed during its first epoch leaves; then an older one's row
    (stopped / "tb").mkdir(parents=True)
    (stopped / "tb" / "events.out.tfevents.1").write_bytes(b"")
    for rows in ("", '{"epoch": 0, "stage": 0, "clean/group_0/probe_acc": 0.5}\n'):
        (stopped / "diagnose.jsonl").write_text(rows)
        r = run_cli_in_process(*cfg, "--out", str(stopped))
        assert r.returncode == 2 and "pass --overwrite" in r.stderr, r.stderr[-2000:]
    from PIL import Image

    Image.new("L", (4, 4)).save(stopped / "diagnose.png")  # a user's image under the plot's name
    photo = (stopped / "diagnose.png").read_bytes()
    r = run_cli_in_process(*cfg, "--out", str(stopped), "--overwrite")
    assert r.returncode == 2 and "its diagnose.png is not a plot pst-dist wrote" in r.stderr, r.stderr[-2000:]
    assert (stopped / "diagnose.png").read_bytes() == photo and (stopped / "tb" / "events.out.tfevents.1").exists()
    # the user's image moved away, --overwrite replaces the stopped output: its old row, events and plot go; its
    # run/ holds only the lock of a diagnose killed (SIGKILL) before the run's first file (was: read as a folder
    # pst-dist did not write, and refused)
    (stopped / "diagnose.png").unlink()
    (stopped / "run").mkdir()
    (stopped / "run" / ".pst-dist.lock").write_text('{"machine": "elsewhere", "pid": 1, "since": "then"}\n')
    r = run_cli_in_process(*cfg, "--out", str(stopped), "--overwrite", "--standard", "--train.epochs=1",
                           "--probe-size=40", "--log.tensorboard=false")
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [json.loads(line) for line in (stopped / "diagnose.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in rows] == [0, 1] and all(row["probe_images"] == 40 for row in rows), rows
    assert not (stopped / "tb" / "events.out.tfevents.1").exists() and any((stopped / "tb").iterdir())
    from pst_dist.io import is_our_png

    assert is_our_png(stopped / "diagnose.png")


def test_a_diagnose_into_an_output_another_is_writing_is_refused_before_it_touches_it(tmp_path, monkeypatch):
    """The run directory's lock is taken before diagnose replaces anything of an earlier output: a second
    `diagnose --overwrite` into an --out another process trains into (a queue script started twice) is refused,
    its rows, TensorBoard events and plot left as they were (was: removed and replaced, then refused at training)."""
    from pst_dist import rundir

    from .conftest import lock_held_elsewhere, run_cli_in_process

    out = tmp_path / "d"
    cfg = ["diagnose", "--config", str(ROOT / "tests" / "configs" / "bench_tiny.toml"), "--poison.kind=patch_noise",
           "--standard", "--train.epochs=1", "--probe-size=40", "--out", str(out)]
    assert run_cli_in_process(*cfg).returncode == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and "run" not in p.relative_to(out).parts}
    with lock_held_elsewhere(out / "run" / rundir.LOCK):
        monkeypatch.setattr(rundir, "LOCK_WAIT_S", 0.5)
        r = run_cli_in_process(*cfg, "--overwrite")
        assert r.returncode == 2 and "process 4242 on elsewhere+1 is training into it" in r.stderr, r.stderr[-2000:]
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and "run" not in p.relative_to(out).parts} \
        == before and len(before) >= 3
