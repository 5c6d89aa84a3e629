"""`pst-dist bench`: the attack x defense matrix on a tiny synthetic recipe, with resume."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "tests" / "configs" / "bench_tiny.toml"


def bench(out: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "pst_dist.cli", "bench", "--config", str(TINY),
                           f"--bench.out={out}", *extra], capture_output=True, text=True, env=env, timeout=900)


@pytest.mark.multiproc
def test_bench_matrix_tables_heatmap_and_resume(tmp_path):
    out = tmp_path / "bench"
    r = bench(out)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = list(csv.DictReader((out / "results.csv").open()))
    # 2 attacks x 4 defenses x 2 seeds; early_stop is read off the standard run (3 training runs per attack/seed)
    assert len(rows) == 16
    assert {(x["attack"], x["defense"]) for x in rows} == {
        (a, d) for a in ("classwise_noise", "em") for d in ("standard", "early_stop", "jpeg10", "pst")}
    for x in rows:
        assert 0 <= float(x["final_test_acc"]) <= 1 and float(x["final_test_acc"]) <= float(x["peak_test_acc"])
    cells = sorted(p.parent for p in (out / "cells").glob("*/*/seed*/summary.json"))
    assert len(cells) == 12 and all(list(c.glob("events.out.tfevents*")) or list((c / "tb").glob("*"))
                                    for c in cells), "a TensorBoard run per cell"
    md = (out / "results.md").read_text()
    assert md.startswith("Regenerate: `pst-dist bench --config")
    assert "| classwise_noise |" in md and " ± " in md and "| em |" in md and "seconds" in md
    assert (out / "heatmap.png").stat().st_size > 1000
    assert "poison em seed 0" in r.stderr and "rounds" in r.stderr  # generation time and surrogate run printed
    # resume: nothing is redone
    mtimes = {c: (c / "summary.json").stat().st_mtime for c in cells}
    r = bench(out)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "cells: 12 finished (skipped), 0 to run" in r.stderr and "poisons: 4 cached, 0 to make" in r.stderr
    assert all((c / "summary.json").stat().st_mtime == m for c, m in mtimes.items())
    # a cell without its summary resumes from its checkpoint (here: the last epoch's), alone, to the same result
    victim = out / "cells" / "em" / "pst" / "seed1"
    (victim / "summary.json").unlink()
    r = bench(out)
    assert r.returncode == 0 and "cells: 11 finished (skipped), 1 to run" in r.stderr
    assert "cell em / pst / seed 1" in r.stderr and "resumed from its checkpoint" in r.stderr
    assert (victim / "summary.json").is_file()
    again = list(csv.DictReader((out / "results.csv").open()))
    assert again == rows


def test_bench_config_errors_name_the_bad_value(tmp_path):
    r = bench(tmp_path / "b", '--bench.attacks=["em", "nope"]')
    assert r.returncode == 2 and "bench.attacks" in r.stderr and "nope" in r.stderr
    r = bench(tmp_path / "b", '--bench.defenses=["pst", "magic"]')
    assert r.returncode == 2 and "magic" in r.stderr
    r = bench(tmp_path / "b", '--schedule.stages=[{name="standard"}]')
    assert r.returncode == 2 and "give the PST schedule" in r.stderr
    assert not (tmp_path / "b").exists(), "nothing written for a bad config"


def test_a_resumed_bench_refuses_a_cached_poison_made_with_other_settings(tmp_path):
    out = tmp_path / "b"
    one = ['--bench.attacks=["classwise_noise"]', '--bench.defenses=["standard"]', "--bench.seeds=1", "--bench.jobs=1",
           "--train.epochs=1"]
    assert bench(out, *one).returncode == 0
    r = bench(out, *one, "--poison.eps=0.0627")
    assert r.returncode == 2 and "made with other poison settings" in r.stderr and "'eps'" in r.stderr


def test_a_resumed_bench_reruns_the_cells_whose_recipe_changed(tmp_path):
    out = tmp_path / "b"
    one = ['--bench.attacks=["classwise_noise"]', '--bench.defenses=["standard", "pst"]', "--bench.seeds=1",
           "--bench.jobs=1", "--train.epochs=1"]
    assert bench(out, *one).returncode == 0
    std = out / "cells" / "classwise_noise" / "standard" / "seed0" / "summary.json"
    before = std.stat().st_mtime
    # the thread count and [bench] do not change a recipe; the PST stages' view does
    r = bench(out, *one, "--bench.jobs=2")
    assert r.returncode == 0 and "cells: 2 finished (skipped), 0 to run" in r.stderr, r.stderr[-2000:]
    r = bench(out, *one, '--schedule.stages.0.loss.view="randblur"')
    assert r.returncode == 0, r.stderr[-2000:]
    assert "cell classwise_noise / pst / seed 0: its recipe changed" in r.stderr
    assert "'schedule.stages.0.loss.view': ('quantize', 'randblur')" in r.stderr
    assert "cells: 1 finished (skipped), 1 to run" in r.stderr
    assert std.stat().st_mtime == before, "the unchanged standard cell is kept"
    [old] = (out / "superseded" / "classwise_noise" / "pst").glob("seed0-*")
    assert (old / "summary.json").is_file() and "quantize" in (old / "config.toml").read_text()
    assert '"randblur"' in (out / "cells" / "classwise_noise" / "pst" / "seed0" / "config.toml").read_text()
