import subprocess
import sys

import pytest

from .conftest import TINY


def run_cli(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "pst_dist.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_demo_prints_table_and_plot(tmp_path):
    out = run_cli("demo", "--out", str(tmp_path), *TINY, "--train.epochs=1", "--log.tensorboard=false")
    assert out.returncode == 0, out.stderr[-2000:]
    for label in ("clean_standard", "poisoned_standard", "poisoned_pst"):
        assert f"| {label} | 1 |" in out.stdout
    assert (tmp_path / "results.md").is_file() and (tmp_path / "test_accuracy.png").stat().st_size > 1000
    again = run_cli("report", str(tmp_path), "--plot", str(tmp_path / "again.png"))
    assert again.returncode == 0 and "poisoned_pst" in again.stdout


def test_train_bad_inputs_exit_nonzero(tmp_path):
    out = run_cli("train", *TINY, "--data.source=fashion-mnist", f"--data.root={tmp_path / 'nope'}",
                  f"--log.run_dir={tmp_path / 'r'}")
    assert out.returncode == 2 and "not found" in out.stderr and "Traceback" not in out.stderr
    out = run_cli("train", *TINY, '--schedule.stages=[{name="x",freeze=[9]}]', f"--log.run_dir={tmp_path / 'r'}")
    assert out.returncode == 2 and "group 9" in out.stderr
    assert not (tmp_path / "r").exists(), "a rejected run must leave nothing behind"
    out = run_cli("train", *TINY, "--resume", f"--log.run_dir={tmp_path / 'r2'}")
    assert out.returncode == 2 and "no checkpoint" in out.stderr


@pytest.mark.slow
def test_vit_recipe_runs(tmp_path):
    out = run_cli("train", "--config", "launch/configs/vit_tiny_synthetic.toml", "--data.synthetic_train=500",
                  "--train.epochs=2", f"--log.run_dir={tmp_path}", "--log.progress=false")
    assert out.returncode == 0, out.stderr[-2000:]
    assert '"final_test_acc"' in out.stdout
