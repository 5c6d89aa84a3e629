"""`pst-dist bench`: the attack x defense matrix on a tiny synthetic recipe, with resume; in a process pool and as
Ray tasks (a real local Ray, a real ``ray start`` cluster), with the same results."""

import csv
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pst_dist.compare import compare, format_comparison
from pst_dist.config import tomllib
from pst_dist.metrics import describe_machine, machine_facts
from tests.conftest import outliving, run_cli_in_process, started, workers_of
from tests.test_tune import OwnRay

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "tests" / "configs" / "bench_tiny.toml"


def bench(out: Path, *extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
    env = env or {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "pst_dist.cli", "bench", "--config", str(TINY),
                           f"--bench.out={out}", *extra], capture_output=True, text=True, env=env, timeout=900)


def bench_refused(out: Path, *extra: str) -> subprocess.CompletedProcess:
    """A bench that is refused before any work: the CLI in this process (conftest.run_cli_in_process), without a
    Python and torch start-up."""
    return run_cli_in_process("bench", "--config", TINY, f"--bench.out={out}", *extra)


@pytest.fixture(scope="module")
def tiny_pool_bench(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess, bytes]:
    """bench_tiny as it is, once for the module, in the process pool: (its out dir, the command, results.csv as it
    first wrote it). The matrix test goes on to resume in that dir; the Ray runner test compares with the bytes."""
    out = tmp_path_factory.mktemp("tiny_pool") / "bench"
    r = bench(out)
    assert r.returncode == 0, r.stderr[-3000:]
    return out, r, (out / "results.csv").read_bytes()


@pytest.mark.multiproc
def test_bench_matrix_tables_heatmap_and_resume(tiny_pool_bench):
    out, r, _ = tiny_pool_bench
    rows = list(csv.DictReader((out / "results.csv").open()))
    # 2 attacks x 5 defenses x 2 seeds; early_stop is read off the standard run (4 training runs per attack/seed)
    assert len(rows) == 20
    assert {(x["attack"], x["defense"]) for x in rows} == {
        (a, d) for a in ("classwise_noise", "em") for d in ("standard", "early_stop", "jpeg10", "ueraser", "pst")}
    for x in rows:
        assert 0 <= float(x["final_test_acc"]) <= 1 and float(x["final_test_acc"]) <= float(x["peak_test_acc"])
    cells = sorted(p.parent for p in (out / "cells").glob("*/*/seed*/summary.json"))
    # each cell trained with its defense: the recorded config (what trained it) carries it
    expect = {"standard": ("none", 1), "jpeg10": ("jpeg", 1), "ueraser": ("ueraser", 1), "pst": ("none", 3)}
    for c in cells:
        rec = tomllib.loads((c / "config.toml").read_text())
        kind, stages = expect[c.parent.name]
        assert (rec["defense"]["kind"], len(rec["schedule"]["stages"])) == (kind, stages), c
        assert rec["defense"]["jpeg_quality"] == 10 or kind != "jpeg"
        assert rec["poison"]["kind"] == c.parent.parent.name
    assert len(cells) == 16 and all(list(c.glob("events.out.tfevents*")) or list((c / "tb").glob("*"))
                                    for c in cells), "a TensorBoard run per cell"
    md = (out / "results.md").read_text()
    # the command that made it: the command line's overrides (bench_tiny's [bench.attack_overrides] took their name)
    assert md.splitlines()[0] == f"Regenerate: `pst-dist bench --config {TINY} --bench.out={out}`", md.splitlines()[0]
    assert "| classwise_noise |" in md and " ± " in md and "| em |" in md and "seconds" in md
    machine = f"Computed on: {describe_machine(machine_facts())} (16 cells, 4 poisons)."  # one made them all
    assert machine in md
    assert (out / "heatmap.png").stat().st_size > 1000
    assert "poison em seed 0" in r.stderr and "rounds" in r.stderr  # generation time and surrogate run printed
    # resume: nothing is redone
    mtimes = {c: (c / "summary.json").stat().st_mtime for c in cells}
    r = bench(out)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "cells: 16 finished (skipped), 0 to run" in r.stderr and "poisons: 4 cached, 0 to make" in r.stderr
    assert all((c / "summary.json").stat().st_mtime == m for c, m in mtimes.items())
    # a cell without its summary resumes from its checkpoint (here: the last epoch's), alone, to the same result
    victim = out / "cells" / "em" / "pst" / "seed1"
    (victim / "summary.json").unlink()
    r = bench(out)
    assert r.returncode == 0 and "cells: 15 finished (skipped), 1 to run" in r.stderr
    assert "cell em / pst / seed 1" in r.stderr and "resumed from its checkpoint" in r.stderr
    assert (victim / "summary.json").is_file()
    again = list(csv.DictReader((out / "results.csv").open()))
    assert again == rows
    assert machine in (out / "results.md").read_text()  # the resumed cell counted once


@pytest.mark.multiproc
def test_compare_reads_the_benchs_own_results(tiny_pool_bench, tmp_path):
    """`pst-dist compare` on a real bench output (tests/test_compare.py has hand-written ones): the worst case is the
    standard cells' lowest mean final validation accuracy, and a B 2 points better in every cell gains 2 points."""
    out = tiny_pool_bench[0]
    c = compare(out, out / "results.csv", defense="standard")
    assert [(r.attack, r.seeds) for r in c.rows] == [("classwise_noise", [0, 1]), ("em", [0, 1])]
    rows = list(csv.DictReader((out / "results.csv").open()))
    means = {a: statistics.mean(float(r["final_val_acc"]) for r in rows if (r["attack"], r["defense"]) ==
                                (a, "standard")) for a in ("classwise_noise", "em")}
    worst = min(means, key=means.get)
    assert c.worst("a") == pytest.approx((worst, means[worst]))
    assert not c.adopt_b and not compare(out, out, margin=0).adopt_b  # no gain: kept at any margin
    assert "B − A +0.00" in format_comparison(c)
    for r in rows:  # B: every standard cell 2 points higher on validation (its test accuracy as it was)
        if r["defense"] == "standard":
            r["final_val_acc"] = repr(float(r["final_val_acc"]) + 0.02)
    better = tmp_path / "results.csv"
    with better.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    c = compare(out, better, defense="standard")
    assert c.gain == pytest.approx(2.0) and c.adopt_b and not compare(out, better, defense="standard", margin=3).adopt_b
    assert c.worst("b") == pytest.approx((worst, means[worst] + 0.02))


def test_results_md_says_when_cells_were_computed_on_several_machines(tmp_path):
    from pst_dist.matrix import write_results

    xeon = {"cpu": "Xeon", "cpu_capability": "AVX512", "env": {}}
    avx2 = {**xeon, "cpu_capability": "AVX2", "env": {"ATEN_CPU_CAPABILITY": "avx2"}}
    result = {"final_test_acc": 0.8, "peak_test_acc": 0.85, "test_acc_at_best_val": 0.84, "final_val_acc": 0.8}
    done = {}
    for s, segments in enumerate([[xeon, xeon], [xeon, avx2], [None]]):  # seed 0 resumed on the same machine, seed
        # 1 on AVX2; seed 2 from before the record
        d = tmp_path / "cells" / "em" / "pst" / f"seed{s}"
        d.mkdir(parents=True)
        meta = {"machine": segments[0], "resumes": [{"epoch": 1, "machine": m} for m in segments[1:]]} \
            if segments[0] else {"machine": "an old string", "resumes": "not a list"}
        (d / "meta.json").write_text(json.dumps(meta))
        done[("em", "pst", s)] = result
    gen = {("em", 0): {"machine": xeon, "seconds": 1.0, "norms": {"linf": 0.03, "l2_mean": 1.0, "l0_mean": 10}}}
    md = write_results(tmp_path, ["em"], ["pst"], [0, 1, 2], done, gen)
    assert "Computed on 2 machines or kernel settings, some results unrecorded (" in md
    assert "- Xeon, AVX512: 2 cells, 1 poison" in md
    assert "- Xeon, AVX2, ATEN_CPU_CAPABILITY=avx2: 1 cell" in md
    unrecorded = "machine not recorded (made before pst-dist recorded it, or an unreadable record): 1 cell"
    assert f"- {unrecorded}" in md
    md = write_results(tmp_path, ["em"], ["pst"], [0], done, gen)  # only the table's cells count
    assert "Computed on: Xeon, AVX512 (1 cell, 1 poison)." in md
    md = write_results(tmp_path, ["em"], ["pst"], [2], {("em", "pst", 2): result}, {})
    assert f"{unrecorded.capitalize()}." in md and "Computed on" not in md
    (tmp_path / "cells" / "em" / "pst" / "seed1" / "meta.json").write_text("[not an object")
    md = write_results(tmp_path, ["em"], ["pst"], [0, 1], done, gen)  # an unreadable record is said, not fatal
    assert "Computed on one machine, some results unrecorded (" in md and f"- {unrecorded}" in md
    assert "AVX2" not in md


def test_bench_config_errors_name_the_bad_value(tmp_path):
    r = bench_refused(tmp_path / "b", '--bench.attacks=["em", "nope"]')
    assert r.returncode == 2 and "bench.attacks" in r.stderr and "nope" in r.stderr
    r = bench_refused(tmp_path / "b", '--bench.defenses=["pst", "magic"]')
    assert r.returncode == 2 and "magic" in r.stderr
    r = bench_refused(tmp_path / "b", '--schedule.stages=[{name="standard"}]')
    assert r.returncode == 2 and "give the PST schedule" in r.stderr
    # a training run's overrides may not change the poison its cells record (they train on the one made once)
    r = bench_refused(tmp_path / "b", '--bench.defense_overrides.standard=["poison.eps=0.1", "poison.ratio=0.5"]')
    assert r.returncode == 2 and "bench.defense_overrides.standard=" in r.stderr and "poison.eps: " in r.stderr, \
        r.stderr
    assert "poison.ratio: " not in r.stderr  # the fraction poisoned is read when training reads the store
    for extra, needle in (('--bench.attacks=["ops", "em", "ops"]', "['ops'] named more than once"),  # one cell twice
                          ('--bench.defenses=["pst", "pst"]', "['pst'] named more than once"),
                          ('--bench.attack_overrides.ops=["train.seed=7"]',
                           "bench.attack_overrides.ops=['train.seed=7']"),
                          ('--bench.defense_overrides.pst=["poison.seed=7"]', "the bench's seeds set poison.seed"),
                          ('--bench.attack_overrides.em=["poison.epz=1"]',  # which entry: the attack's
                           "bench.attack_overrides.em=['poison.epz=1']: unknown config key 'poison.epz'"),
                          ('--bench.defense_overrides.pst=["train.epochs=0"]',  # which entry: the run's
                           "(bench.defense_overrides.pst=['train.epochs=0']): train.epochs=0: must be >= 1"),
                          (('--bench.attack_overrides.em=["poison.eot=1"]',  # an error of both entries: each named
                            '--bench.defense_overrides.standard=["data.augment=\\"rrc_flip\\""]'),
                           "the em / standard cells (bench.attack_overrides.em=['poison.eot=1'] with "
                           "bench.defense_overrides.standard=['data.augment=\"rrc_flip\"']): poison.eot=1 "
                           "differentiates"),
                          ("--data.val_size=0", "data.val_size=0 leaves no validation images"),
                          ("--schedule.stages.1.freeze=[0, 6]", "the classwise_noise / pst cells: schedule.stages[1]"),
                          ('--bench.defense_overrides.pst=["schedule.stages.2.group_mults={\\"7\\"=0.1}"]',
                           "the classwise_noise / pst cells (bench.defense_overrides.pst=['schedule.stages.2.group_"
                           "mults={\"7\"=0.1}']): schedule.stages[2] ('release') names group 7, but the model has 6 "
                           "groups")):
        r = bench_refused(tmp_path / "b", *([extra] if isinstance(extra, str) else extra))
        assert r.returncode == 2 and needle in r.stderr, (extra, r.stderr[-2000:])
    mine = tmp_path / "mine"  # a folder of the user's own results, no bench's record: not written over
    mine.mkdir()
    (mine / "results.md").write_text("my results\n")
    r = bench_refused(mine)
    assert r.returncode == 2 and "holds results.md, which a bench writes, but no bench.json" in r.stderr, r.stderr
    assert sorted(p.name for p in mine.iterdir()) == ["results.md"]
    assert not (tmp_path / "b").exists(), "nothing written for a bad config"


def test_a_resumed_bench_refuses_a_cached_poison_made_with_other_settings(tmp_path):
    out = tmp_path / "b"
    one = ['--bench.attacks=["classwise_noise"]', '--bench.defenses=["standard"]', "--bench.seeds=1", "--bench.jobs=1",
           "--train.epochs=1"]
    assert bench(out, *one).returncode == 0
    recorded = (out / "bench.json").read_bytes()
    r = bench_refused(out, *one, "--poison.eps=0.0627")
    assert r.returncode == 2 and "made with other poison settings" in r.stderr and "'eps'" in r.stderr
    assert (out / "bench.json").read_bytes() == recorded, "a refused bench rewrote the bench's record"


def test_a_cached_model_based_poison_is_refused_for_another_surrogate(tmp_path):
    """EM is crafted against the recipe's [model]: a cache made with another surrogate is not that recipe's attack."""
    out = tmp_path / "b"
    one = ['--bench.attacks=["em"]', '--bench.defenses=["standard"]', "--bench.seeds=1", "--bench.jobs=1",
           "--train.epochs=1", "--poison.steps=2", "--poison.train_steps=2", "--poison.max_rounds=1"]
    assert bench(out, *one).returncode == 0
    r = bench_refused(out, *one, "--model.width=0.25")
    assert r.returncode == 2 and "made with other poison settings" in r.stderr, r.stderr[-2000:]
    assert "'model.width': (0.125, 0.25)" in r.stderr, r.stderr[-2000:]
    r = bench_refused(out, *one, "--train.bf16=true")  # the surrogate's autocast crafts another poison
    assert r.returncode == 2 and "'train.bf16': (False, True)" in r.stderr, r.stderr[-2000:]
    r = bench(out, *one, "--model.block_groups=2")  # how PST groups the layers: the same surrogate, the cache reused
    assert r.returncode == 0 and "poisons: 1 cached, 0 to make" in r.stderr, r.stderr[-2000:]


def test_a_resumed_bench_names_a_finished_cells_summary_without_its_accuracies(tmp_path):
    out = tmp_path / "b"
    one = ['--bench.attacks=["classwise_noise"]', '--bench.defenses=["standard"]', "--bench.seeds=1", "--bench.jobs=1",
           "--train.epochs=1"]
    assert bench(out, *one).returncode == 0
    f = out / "cells" / "classwise_noise" / "standard" / "seed0" / "summary.json"
    summary = json.loads(f.read_text())
    results = (out / "results.csv").read_bytes()
    for bad, says in (({k: v for k, v in summary.items() if k != "final_val_acc"}, "no final_val_acc"),
                      (dict(summary, peak_test_acc="n/a"), "peak_test_acc='n/a'")):
        f.write_text(json.dumps(bad))
        r = bench_refused(out, *one)
        assert r.returncode == 2 and f"{f}: " in r.stderr and says in r.stderr, r.stderr[-2000:]
        assert "move " in r.stderr and "Traceback" not in r.stderr
        assert (out / "results.csv").read_bytes() == results, "a refused bench rewrote its table"
    # one that is not a summary at all (cut short) is run again, as a failed cell is
    f.write_text("[1, 2]")
    r = bench(out, *one)
    assert r.returncode == 0 and "0 finished (skipped), 1 to run" in r.stderr, r.stderr[-2000:]
    assert json.loads(f.read_text())["final_test_acc"] == summary["final_test_acc"]


def test_a_directory_in_a_poisons_place_that_is_not_a_store_is_refused_and_left_alone(tmp_path):
    """bench.out may be a directory the user already had: what lies where a poison store would go is never replaced
    (the bench's own stores are renamed into place whole, with their poison.json)."""
    out = tmp_path / "b"
    theirs = out / "poisons" / "classwise_noise_seed0"
    theirs.mkdir(parents=True)
    (theirs / "notes.txt").write_text("a user's file\n")
    r = bench_refused(out, '--bench.attacks=["classwise_noise"]', '--bench.defenses=["standard"]', "--bench.seeds=1",
                      "--bench.jobs=1", "--train.epochs=1")
    assert r.returncode == 2 and "not a poison store" in r.stderr and "bench.out" in r.stderr, r.stderr[-2000:]
    assert (theirs / "notes.txt").read_text() == "a user's file\n"
    assert sorted(theirs.iterdir()) == [theirs / "notes.txt"]
    assert sorted(out.iterdir()) == [out / "poisons"]  # no cells, no bench.json


def test_a_resumed_bench_reruns_the_cells_whose_recipe_changed(tmp_path):
    out = tmp_path / "b"
    one = ['--bench.attacks=["classwise_noise"]', '--bench.defenses=["standard", "pst"]', "--bench.seeds=1",
           "--bench.jobs=1", "--train.epochs=1"]
    assert bench(out, *one).returncode == 0
    std = out / "cells" / "classwise_noise" / "standard" / "seed0" / "summary.json"
    before = std.stat().st_mtime
    # the thread count, [bench] and [tune] (a search's best_schedule.toml carries one) do not change a recipe; the
    # PST stages' view does
    r = bench(out, *one, "--bench.jobs=2", "--tune.num_samples=3")
    assert r.returncode == 0 and "cells: 2 finished (skipped), 0 to run" in r.stderr, r.stderr[-2000:]
    # the PST stages' view and the recipe's test-time views (PST's: the standard cell neither carries them nor reruns)
    r = bench(out, *one, '--schedule.stages.0.loss.view="randblur"', '--schedule.eval_views=["blur:1"]')
    assert r.returncode == 0, r.stderr[-2000:]
    assert "cell classwise_noise / pst / seed 0: its recipe changed" in r.stderr
    assert "'schedule.stages.0.loss.view': ('quantize', 'randblur')" in r.stderr
    assert "'schedule.eval_views': ([], ['blur:1'])" in r.stderr
    assert "cells: 1 finished (skipped), 1 to run" in r.stderr
    assert std.stat().st_mtime == before, "the unchanged standard cell is kept (it takes no PST view)"
    [old] = (out / "superseded" / "classwise_noise" / "pst").glob("seed0-*")
    assert (old / "summary.json").is_file() and "quantize" in (old / "config.toml").read_text()
    new = (out / "cells" / "classwise_noise" / "pst" / "seed0" / "config.toml").read_text()
    assert '"randblur"' in new and '"blur:1"' in new


def test_a_resumed_bench_compares_auto_by_the_device_a_cell_trained_on(tmp_path):
    # 'auto' was judged on this machine: a GPU cell recorded deterministic=false (what auto means there) counted as
    # another recipe than auto on this CPU; and the reverse check must not re-run GPU cells from a GPU-less driver
    out = tmp_path / "b"
    one = ['--bench.attacks=["classwise_noise"]', '--bench.defenses=["standard"]', "--bench.seeds=1",
           "--bench.jobs=1", "--train.epochs=1"]
    assert bench(out, *one, "--train.deterministic=false", "--train.channels_last=true").returncode == 0
    cell = out / "cells" / "classwise_noise" / "standard" / "seed0"
    meta = json.loads((cell / "meta.json").read_text())
    meta["resolved"]["device"] = "cuda:0"  # as a GPU machine records it
    (cell / "meta.json").write_text(json.dumps(meta))
    r = bench(out, *one)  # auto, from this CPU: on the cell's GPU the same settings
    assert r.returncode == 0 and "cells: 1 finished (skipped), 0 to run" in r.stderr, r.stderr[-2000:]
    r = bench(out, *one, "--train.deterministic=true")  # not what the cell trained with, on any device
    assert r.returncode == 0 and "cell classwise_noise / standard / seed 0: its recipe changed" in r.stderr, r.stderr
    assert "'train.deterministic': (False, True)" in r.stderr and "channels_last" not in r.stderr
    [old] = (out / "superseded" / "classwise_noise" / "standard").glob("seed0-*")
    assert json.loads((old / "meta.json").read_text())["resolved"]["device"] == "cuda:0"  # kept, not removed


# ---------------------------------------------------------------- a DeepSpeed cell resumes

ONE = ['--bench.attacks=["classwise_noise"]', '--bench.defenses=["standard"]', "--bench.seeds=1", "--bench.jobs=1"]
CELL = Path("cells") / "classwise_noise" / "standard" / "seed0"

# the bench's first cell in this process (no pool), killed (-9) as soon as its epoch-1 checkpoint is written
KILLED_AFTER_EPOCH_1 = """
import os, signal, sys
import pst_dist.matrix as m
bench = m.plan_bench(sys.argv[1], sys.argv[2:])
a, r, s = bench.cells[0]
pdir = str(bench.poison_dir(a, s))
m.generate_poison(bench.base, a, s, pdir, bench.threads)
train = m.train
def killed(*args, **kw):
    kw["on_epoch"] = lambda epoch, *_: os.kill(os.getpid(), signal.SIGKILL) if epoch == 1 else None
    return train(*args, **kw)
m.train = killed
m.run_cell(bench.base, a, r, s, str(bench.out), pdir, bench.threads)
"""


def plain_env() -> dict:
    """No launcher variables: a DeepSpeed cell makes its own one-process group (gloo on the CPU)."""
    drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    return {**{k: v for k, v in os.environ.items() if k not in drop}, "OMP_NUM_THREADS": "1"}


@pytest.mark.slow  # over a minute; tests/test_deepspeed.py's kill -9 resume tests cover the engine by default
def test_an_interrupted_deepspeed_cell_resumes_to_the_uninterrupted_result(tmp_path):
    from pst_dist.engine import DeepSpeedEngine

    # 3 epochs (bench_tiny); two cells, one after the other in the one pool process (each its own engine)
    ds = [*ONE, '--bench.defenses=["standard", "jpeg10"]', "--deepspeed.enabled=true"]
    full, cut = tmp_path / "full", tmp_path / "cut"
    r = bench(full, *ds, env=plain_env())
    assert r.returncode == 0, r.stderr[-3000:]
    assert (full / CELL / "ds_checkpoint" / "latest").is_file() and not (full / CELL / "checkpoint.pt").exists()
    p = subprocess.run([sys.executable, "-c", KILLED_AFTER_EPOCH_1, str(TINY), f"--bench.out={cut}", *ds],
                       capture_output=True, text=True, env=plain_env(), timeout=600, cwd=ROOT)
    assert p.returncode == -9, p.stderr[-3000:]
    assert DeepSpeedEngine.checkpoint_epoch(cut / CELL) == 1 and not (cut / CELL / "summary.json").exists()
    r = bench(cut, *ds, env=plain_env())
    assert r.returncode == 0, r.stderr[-3000:]
    assert "poisons: 1 cached, 0 to make; cells: 0 finished (skipped), 2 to run" in r.stderr
    assert "cell classwise_noise / jpeg10 / seed 0: " in r.stderr and "FAILED" not in r.stderr
    assert re.search(r"cell classwise_noise / standard / seed 0: .*resumed from its checkpoint", r.stderr)
    assert [x["epoch"] for x in json.loads((cut / CELL / "meta.json").read_text())["resumes"]] == [1]
    assert (cut / "results.csv").read_text() == (full / "results.csv").read_text()
    for cell in (CELL, CELL.parent.parent / "jpeg10" / "seed0"):
        a, b = (json.loads((d / cell / "summary.json").read_text()) for d in (full, cut))
        assert a["test_curve"] == b["test_curve"] and a["model_checksum"] == b["model_checksum"], cell


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the kernel's parent-death signal is Linux's")
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_the_pool_s_workers_end_with_a_killed_bench(tmp_path, sig):
    """A bench stopped by a scheduler (SIGTERM to its command) or killed (an OOM kill): its pool workers end with it
    (were orphaned, went on training their cells and took more, and a rerun then trained the same cells beside
    them, in the same run directories)."""
    out = tmp_path / "b"
    cmd = [sys.executable, "-m", "pst_dist.cli", "bench", "--config", str(TINY), f"--bench.out={out}",
           '--bench.attacks=["classwise_noise"]', '--bench.defenses=["standard"]', "--bench.seeds=2", "--bench.jobs=2",
           "--train.epochs=500"]
    with started(cmd, "multiprocessing", env=plain_env()) as (proc, workers):
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None and not list(out.glob("cells/*/*/seed*/metrics.jsonl")):
            time.sleep(0.2)  # a cell is training
        workers += workers_of(proc.pid)
        assert proc.poll() is None and len(workers) == 2, "the bench's two pool workers never trained a cell"
        proc.send_signal(sig)
        proc.wait(timeout=60)
        assert not outliving(workers), "a pool worker outlived its bench"


# ---------------------------------------------------------------- the bench's poison cache is a poison store

def test_a_poison_cached_by_the_bench_trains_with_poison_kind_file(tmp_path):
    """The cache holds the cell's training split only (rows.npy beside the images); `pst-dist train` with
    poison.kind = "file" reads it, checked, and trains the very cell again; a split needing other images is refused."""
    out = tmp_path / "b"
    r = bench(out, *ONE, "--train.epochs=1")
    assert r.returncode == 0, r.stderr[-3000:]
    cache = out / "poisons" / "classwise_noise_seed0"
    meta = json.loads((cache / "poison.json").read_text())
    assert meta["format"] == "pst-dist-poison/1" and meta["rows"] == "rows.npy" and len(meta["rows_sha256"]) == 64
    assert meta["shape"][0] == 256 and meta["source_size"] == 320  # 64 of the source's images are validation
    assert "cpu_capability" in meta["machine"]  # which kernels crafted it
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    again = tmp_path / "again"
    t = subprocess.run([sys.executable, "-m", "pst_dist.cli", "train", "--config", str(out / CELL / "config.toml"),
                        "--poison.kind=file", f"--poison.path={cache}", f"--log.run_dir={again}"],
                       capture_output=True, text=True, env=env, timeout=600)
    assert t.returncode == 0, t.stderr[-3000:]
    a, b = (json.loads((d / "summary.json").read_text()) for d in (out / CELL, again))
    assert a["test_curve"] == b["test_curve"] and a["model_checksum"] == b["model_checksum"]
    # the same source (320 images), another split: 32 of its training images were validation images in the bench
    t = run_cli_in_process("train", "--config", out / CELL / "config.toml", "--poison.kind=file",
                           f"--poison.path={cache}", f"--log.run_dir={tmp_path / 'other'}",
                           "--data.synthetic_train=288", "--data.val_size=32")  # refused before any work: in-process
    assert t.returncode == 2 and "holds 256 of the source's 320 training images" in t.stderr, t.stderr[-2000:]
    assert "32 of the 288 images this one trains on are not in it" in t.stderr


def test_a_store_of_some_rows(tmp_path):
    import numpy as np
    import torch

    from pst_dist.poison import PoisonFileError, norms
    from pst_dist.poison.store import FORMAT, fill, read_stored

    g = torch.Generator().manual_seed(0)
    clean = torch.randint(0, 256, (8, 3, 4, 4), dtype=torch.uint8, generator=g)
    poisoned = (clean.to(torch.int16) + torch.randint(-2, 3, clean.shape, generator=g)).clamp(0, 255).to(torch.uint8)

    def store(name: str, rows: list[int]) -> Path:
        d = tmp_path / name
        d.mkdir()
        idx = torch.tensor(rows)
        meta = {"format": FORMAT, "attack": "classwise_noise", "parameters": {"eps": 8 / 255}, "seed": 0,
                "norms": norms(clean[idx], poisoned[idx])}
        fill(d, poisoned[idx], meta, rows=idx, source_size=8)
        return d

    some = store("some", [6, 1, 3, 4])
    assert np.load(some / "rows.npy").tolist() == [1, 3, 4, 6]  # sorted by source index, int64
    assert torch.equal(torch.from_numpy(np.load(some / "train_images.npy")), poisoned[[1, 3, 4, 6]])
    idx = torch.tensor([4, 1, 6])  # a training split's order
    assert torch.equal(read_stored(some, clean[idx], idx, 8), poisoned[idx])
    idx = torch.tensor([4, 2, 1, 0])
    with pytest.raises(PoisonFileError, match="holds 4 of the source's 8 .* 2 of the 4 images this one trains on"):
        read_stored(some, clean[idx], idx, 8)
    with pytest.raises(PoisonFileError, match="made for a source of 8 training images; this one has 9"):
        read_stored(some, clean[:3], torch.arange(3), 9)
    every = store("every", [5, 0, 7, 2, 1, 3, 6, 4])  # every image: a plain store, in the source's order
    assert not (every / "rows.npy").exists() and "rows" not in json.loads((every / "poison.json").read_text())
    assert torch.equal(torch.from_numpy(np.load(every / "train_images.npy")), poisoned)
    np.save(some / "rows.npy", np.array([1, 3, 5, 6]))  # rows changed after writing
    with pytest.raises(PoisonFileError, match="rows.npy: changed since it was written"):
        read_stored(some, clean[[1]], torch.tensor([1]), 8)
    np.save(some / "rows.npy", np.array([3, 1, 4, 6]))  # unsorted (unchecked hash: the rows themselves are checked)
    with pytest.raises(PoisonFileError, match="expected distinct source indices in \\[0, 8\\), sorted"):
        read_stored(some, clean[[1]], torch.tensor([1]), 8, verify=False)


# ---------------------------------------------------------------- bench.runner = "ray": the pool's results, on Ray
# Ray's state is each test's own (tests/test_tune.py's OwnRay: an empty HOME, a fresh token, its own temp dir); at
# teardown only the Ray processes the test started are stopped


@pytest.fixture
def own_ray(tmp_path):
    """A test's own Ray state (as tests/test_tune.py's fixture of this name); afterwards the Ray processes it
    started are stopped (and only those) and its temp dir removed."""
    state = OwnRay(tmp_path / "home")
    yield state
    left = state.close()
    assert not left, f"Ray processes still running after teardown: {left}"


BLOCKED = Path("cells") / "classwise_noise" / "jpeg10" / "seed0"  # a file where the cell's run directory goes


def ray_bench(own: OwnRay, out: Path, *extra: str, address: str = "") -> subprocess.CompletedProcess:
    """`pst-dist bench` with bench.runner = "ray" (a local Ray of its own, or the cluster at ``address``), in a
    session of its own that the test's teardown stops if anything of it outlives the command."""
    env = {**own.env(), "OMP_NUM_THREADS": "1", **({"RAY_ADDRESS": address} if address else {})}
    cmd = [sys.executable, "-m", "pst_dist.cli", "bench", "--config", str(TINY), f"--bench.out={out}",
           "--bench.runner=ray", *extra]
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    own.pgids.append(p.pid)  # its own session: what it leaves running is in this process group
    stdout, stderr = p.communicate(timeout=900)
    return subprocess.CompletedProcess(cmd, p.returncode, stdout, stderr)


def still_running(own: OwnRay, seconds: float = 15) -> list:
    """The Ray processes the test started that are still alive ``seconds`` after asking (Ray stops in the
    background)."""
    deadline = time.time() + seconds
    while (left := own.processes()) and time.time() < deadline:
        time.sleep(0.25)
    return left


@pytest.mark.multiproc
def test_the_ray_runner_gives_the_pools_results_byte_for_byte(own_ray, tmp_path, tiny_pool_bench):
    """bench_tiny as it is (16 cells, 2 in flight) in the process pool and as Ray tasks on a local Ray the command
    starts and stops: the same functions with the same seeds and threads, the same results.csv."""
    r = ray_bench(own_ray, tmp_path / "ray")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Ray: a new local Ray" in r.stderr and "1 CPU(s) (1 torch thread(s)) and 0 GPU(s): train.device = cpu" \
        in r.stderr and "at most 2 in flight" in r.stderr, r.stderr[-3000:]
    assert "cells: 0 finished (skipped), 16 to run" in r.stderr and "16 of 16 cells finished, 0 failed" in r.stderr
    assert (tmp_path / "ray" / "results.csv").read_bytes() == tiny_pool_bench[2]
    assert not still_running(own_ray), "the local Ray the bench started is stopped when it ends"
    assert not (own_ray.home / ".ray").exists(), "nothing read from or written to ~/.ray"


@pytest.mark.slow  # the byte-identical Ray runner test stays in the default run
@pytest.mark.multiproc
def test_on_a_cluster_the_ray_runner_records_a_failed_cell_as_the_pool_does(own_ray, tmp_path):
    """RAY_ADDRESS names a running cluster: the bench joins it (no cap on tasks in flight: bench.jobs = 0), a cell
    whose run directory cannot be made fails as it does in the pool (same line, exit 1, the other cell's result
    kept), and the cluster is still up afterwards."""
    _, gcs = own_ray.start_head()  # ray start --head: its ports, temp dir, HOME and token the test's own
    small = [*ONE, '--bench.defenses=["standard", "jpeg10"]', "--train.epochs=1", "--bench.jobs=0"]
    for d in ("pool", "ray"):
        (tmp_path / d / BLOCKED).parent.mkdir(parents=True)
        (tmp_path / d / BLOCKED).write_text("not a run directory\n")
    pool = bench(tmp_path / "pool", *small)
    r = ray_bench(own_ray, tmp_path / "ray", *small, address=gcs)
    assert pool.returncode == 1 and r.returncode == 1, (pool.stderr[-2000:], r.stderr[-3000:])
    assert f"Ray: cluster at {gcs}" in r.stderr and "as many in flight as fit" in r.stderr, r.stderr[-3000:]

    def failed(p: subprocess.CompletedProcess, out: Path) -> list[str]:
        return [m.replace(str(out), "<out>") for m in re.findall(r"\[bench\] FAILED [^\r\n]*", p.stderr)]

    assert failed(r, tmp_path / "ray") == failed(pool, tmp_path / "pool") == [
        "[bench] FAILED ('cell', 'classwise_noise', 'jpeg10', 0): RunDirError: log.run_dir='<out>/cells/"
        "classwise_noise/jpeg10/seed0': exists and is not a directory"]
    assert (tmp_path / "ray" / "results.csv").read_bytes() == (tmp_path / "pool" / "results.csv").read_bytes()
    assert any("raylet" in " ".join(p.cmdline()) for p in own_ray.processes()), "the cluster was stopped"


@pytest.mark.slow
@pytest.mark.multiproc
def test_ray_submit_s_bench_runs_its_cells_on_the_cluster_started_on_its_node(own_ray, tmp_path):
    """``ray submit`` runs a script on the head without RAY_ADDRESS: `pst-dist bench --bench.runner=ray` there
    started a private Ray (the whole matrix on the head). launch/bench_ray.py joins the cluster ``ray start``
    started on its node (its address file under Ray's temp dir: this test's, RAY_TMPDIR), as tune/run.py does, and
    is refused, writing nothing, where none runs."""
    env = {**own_ray.env(), "OMP_NUM_THREADS": "1"}  # no RAY_ADDRESS, as under ray submit
    out = tmp_path / "b"
    cmd = [sys.executable, str(ROOT / "launch" / "bench_ray.py"), "--config", str(TINY), f"--bench.out={out}", *ONE,
           "--train.epochs=1"]
    alone = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert alone.returncode == 2 and "launch/bench_ray.py runs on a running Ray cluster: RAY_ADDRESS is unset and " \
        "no `ray start` ran on this machine" in alone.stderr, alone.stderr[-2000:]
    assert not out.exists()
    _, gcs = own_ray.start_head(num_cpus=2, temp=own_ray.temp / "ray")  # where Ray records it under RAY_TMPDIR
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    port = gcs.rsplit(":", 1)[1]  # (Ray records the node's own IP)
    joined = re.search(r"\[bench\] RAY_ADDRESS unset \(ray submit\): joining the Ray cluster started on this node, "
                       r"at (\S+:" + port + ")", r.stderr)
    assert joined and f"Ray: cluster at {joined[1]}" in r.stderr, r.stderr[-3000:]
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert [(row["attack"], row["defense"]) for row in rows] == [("classwise_noise", "standard")], rows
    assert any("raylet" in " ".join(p.cmdline()) for p in own_ray.processes()), "the cluster was stopped"


def test_verdicts_do_not_count_cells_that_have_not_run_as_below() -> None:
    from pst_dist.matrix import _verdicts

    finals = {("none", "pst"): [0.85], ("lsp", "pst"): [0.83, 0.81], ("em", "pst"): [0.78], ("ar", "pst"): [],
              ("lsp", "jpeg10"): [0.5], ("em", "jpeg10"): [0.6]}
    verdicts = lambda: _verdicts(["none", "lsp", "em", "ar"], ["jpeg10", "pst"], lambda a, d, k: finals.get((a, d), []))
    text = verdicts()
    assert "- PST final >= 80 % on 1 of 3 attacks (below: em; no result yet: ar)." in text, text
    assert "- PST final >= JPEG-10 final on 2 of 3 attacks (lsp, em; no result yet: ar)." in text, text
    finals[("ar", "pst")] = [0.9]
    text = verdicts()
    assert "- PST final >= 80 % on 2 of 3 attacks (below: em)." in text, text
    assert "- PST final >= JPEG-10 final on 2 of 3 attacks (lsp, em; no result yet: ar)." in text, text  # no JPEG yet
    finals[("ar", "jpeg10")] = [0.95]
    assert "- PST final >= JPEG-10 final on 2 of 3 attacks (lsp, em)." in verdicts()
