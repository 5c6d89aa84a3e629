"""The speed scripts in bench/ keep running where there is no GPU: each at toy sizes on the CPU; and the result
scripts' run queue (launch/_jobs.sh)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_gpu_throughput_runs_tiny_on_the_cpu():
    (resnet,) = _load("gpu_throughput").main(["--tiny", "--epochs", "3", "--only", "resnet18"])
    assert resnet["device"] == "cpu" and resnet["trainer"] > 0 and resnet["bare_eager"] > 0
    assert resnet["trainer_vs_bare_eager"] == pytest.approx(resnet["trainer"] / resnet["bare_eager"])
    assert resnet["trainer_throughput"]["img_per_s"] > 0


@pytest.mark.slow  # a minute: DeepSpeed twice; the resnet case above keeps the script in the default run
def test_gpu_throughput_vit_case_runs_zero0_and_zero3_on_the_cpu():
    (vit,) = _load("gpu_throughput").main(["--tiny", "--epochs", "3", "--only", "vit"])
    assert not [k for k in vit if k.endswith("_error")], vit  # ZeRO-0 and ZeRO-3 through DeepSpeed on the CPU too
    assert vit["augment"] == "rrc_flip" and vit["trainer_zero0"] > 0 and vit["trainer_zero3"] > 0


def test_gpu_throughput_refuses_too_few_epochs(capsys):
    with pytest.raises(SystemExit) as e:
        _load("gpu_throughput").main(["--tiny", "--epochs", "2"])
    assert e.value.code != 0 and "--epochs" in f"{e.value.code} {capsys.readouterr().err}"


def test_data_wait_compares_the_two_loaders():
    rows = _load("data_wait").main(["--epochs", "2", "--images", "512", "--size", "16", "--batch", "64",
                                    "--width", "0.125", "--repeats", "2"])
    assert [(r["loader"], r["repeat"]) for r in rows] == [("synchronous", 0), ("prefetching", 0),
                                                          ("synchronous", 1), ("prefetching", 1)]
    assert all(0 <= r["data_wait"] < 1 and r["img_per_s"] > 0 for r in rows)
    # like with like: the two differ in data.prefetch alone (same data, model, batch, threads, epochs timed)
    same = ("augment", "size", "batch", "width", "threads", "epochs_timed")
    assert len({tuple(r[k] for k in same) for r in rows}) == 1, rows
    assert {r["loader"]: r["setting"] for r in rows} == {"synchronous": "--data.prefetch=0",
                                                         "prefetching": "--data.prefetch=2"}


def test_data_wait_compares_an_image_folder_in_memory_and_streamed():
    rows = _load("data_wait").main(["--epochs", "2", "--images", "256", "--size", "16", "--batch", "64",
                                    "--width", "0.125", "--folder"])
    assert [r["loader"] for r in rows] == ["in-memory", "streamed"]
    assert all(0 <= r["data_wait"] < 1 and r["img_per_s"] > 0 for r in rows)


@pytest.mark.slow  # a minute: the model compiled twice (aot_autograd, no kernels built)
def test_host_launches_counts_the_trainer_against_the_compiled_bare_loop():
    row = _load("host_launches").main(["--epochs", "3"])
    assert row["same_graphs"], row["graph_nodes"]  # the trainer compiles the model the bare loop compiles
    assert row["trainer_graphs_per_step"] == pytest.approx(2, abs=0.1)  # forward and backward, no graph break
    assert row["bare_graphs_per_step"] == pytest.approx(2)
    # what the training thread adds per step (stage, lr, metrics on the device, one fused call per param group):
    # tens of calls, most of them views and no-op moves; a per-step host loop over parameters would add hundreds
    assert 0 < row["trainer_calls_per_step"] - row["bare_calls_per_step"] < 60, row["extra_calls"]


def test_ratio_summary_prints_the_median_and_the_range():
    from pst_dist.report import ratio_summary

    assert ratio_summary([1.24, 0.96, 1.01]) == "x1.01 (median of 3 pairs; range x0.96-x1.24)"
    assert ratio_summary([0.5], "blocks") == "x0.50"  # one ratio has no range to give
    with pytest.raises(ValueError, match="no ratios"):
        ratio_summary([])


@pytest.mark.slow  # two minutes: DeepSpeed in this process, then torchrun with 1 and 2 processes, twice
@pytest.mark.multiproc
def test_engine_overhead_alternates_the_launches_and_gives_their_ratios():
    res = _load("engine_overhead").main(["--steps", "4", "--repeats", "2"])
    assert len(res["block_ratios"]) == 4 and all(r > 0 for r in res["block_ratios"])
    assert len(res["images_per_s"]) == 2 and res["scaling"] == [b / a for a, b in res["images_per_s"]]


@pytest.mark.slow  # a minute: torchrun with 2 gloo processes
@pytest.mark.multiproc
def test_allreduce_overlap_times_every_variant_in_four_blocks():
    res = _load("allreduce_overlap").main(["--steps", "4", "--bucket-mb", "1"])
    assert set(res["block_s"]) == {"per-parameter", "buckets 1 MB"}
    assert all(len(b) == 4 and min(b) > 0 for b in res["block_s"].values())


def test_engine_overhead_refuses_too_few_steps(capsys):
    with pytest.raises(SystemExit):
        _load("engine_overhead").main(["--steps", "3"])
    assert "--steps 3: need >= 4" in capsys.readouterr().err


def test_the_result_scripts_queue_resumes_a_run_cut_short(tmp_path):
    """launch/_jobs.sh (science_fmnist.sh, beton_equivalence.sh): a run with its config.toml but no summary.json was
    queued again without --resume, which train refuses (exit 2): every rerun of the script stopped there. The queue
    now launches every run with --resume=auto."""
    import json
    import os
    import shlex
    import subprocess
    import sys

    from .conftest import TINY

    run = tmp_path / "runs" / "a"
    args = [*TINY, "--train.epochs=2", "--log.tensorboard=false"]
    base = [sys.executable, "-m", "pst_dist.cli", "train", *args, f"--log.run_dir={run}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    assert subprocess.run(base, env=env, capture_output=True, timeout=300).returncode == 0
    (run / "summary.json").unlink()  # as a run killed in its last epoch leaves it (checkpoints of epochs 1 and 2)
    (tmp_path / ".venv" / "bin").mkdir(parents=True)  # the scripts call .venv/bin/pst-dist from the repository
    (tmp_path / ".venv" / "bin" / "pst-dist").symlink_to(Path(sys.executable).parent / "pst-dist")
    jobs = shlex.quote(str(ROOT / "launch" / "_jobs.sh"))
    script = f"source {jobs}; queue_run {shlex.join([str(run), *args])}; run_queued"
    r = subprocess.run(["bash", "-c", f"set -euo pipefail; {script}"], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=300)
    log = (tmp_path / "runs" / "a.log").read_text()
    assert r.returncode == 0, r.stderr + log[-2000:]
    assert [r["epoch"] for r in json.loads((run / "meta.json").read_text())["resumes"]] == [2]  # resumed, not redone
    # cut short in its first epoch (its config.toml and meta.json, no checkpoint or epoch logged yet): nothing to
    # resume from, started again
    first = tmp_path / "runs" / "b"
    assert subprocess.run([*base[:-1], f"--log.run_dir={first}"], env=env, capture_output=True,
                          timeout=300).returncode == 0
    for name in ("summary.json", "checkpoint.pt", "metrics.jsonl"):
        (first / name).unlink()
    script = f"source {jobs}; queue_run {shlex.join([str(first), *args])}; run_queued"
    r = subprocess.run(["bash", "-c", f"set -euo pipefail; {script}"], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr + (tmp_path / "runs" / "b.log").read_text()[-2000:]
    assert "starting it again from epoch 0" in (tmp_path / "runs" / "b.log").read_text()
    assert "resumes" not in json.loads((first / "meta.json").read_text())  # a new run
    assert json.loads((first / "summary.json").read_text())["status"] == "finished"
