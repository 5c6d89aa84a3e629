"""FFCV .beton path: lossless round trip, sharding over 2 real processes, bad files, atomic writes, and the
trainer consuming a .beton (real ffcv, real files)."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pst_dist.config import load_config
from pst_dist.data import beton as B
from pst_dist.data.pipeline import build_data, write_betons
from pst_dist.data.sources import DataError, fingerprint
from pst_dist.io import sha256
from pst_dist.poison import PoisonFileError
from pst_dist.train import train

from .conftest import TINY, child_env

FMNIST = ["--data.source=fashion-mnist", "--data.train_size=300", "--data.val_size=100", "--data.test_size=200"]
SMALL = ["--data.source=synthetic", "--data.synthetic_train=300", "--data.val_size=60", "--data.img_size=16"]


def cfg_of(*over):
    return load_config(None, list(over))


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("b") / "synth"
    write_betons(cfg_of(*SMALL, "--poison.kind=patch_noise"), out, log=lambda m: None)
    return out


@pytest.mark.parametrize("over", [SMALL, FMNIST], ids=["rgb", "gray"])
def test_raw_round_trip_is_exact(tmp_path, over):
    if over is FMNIST and not Path("/usr/share/datasets/fashion-mnist").is_dir():
        pytest.skip("dataset-fashion-mnist not installed")
    cfg = cfg_of(*over, "--poison.kind=classwise_noise")
    write_betons(cfg, tmp_path / "d", log=lambda m: None)
    data = build_data(cfg)
    b = B.BetonDir(tmp_path / "d")
    got = {k: b.read_split(k, num_workers=1) for k in B.SPLITS}
    want = {"train": (data.poisoned_train, data.splits.train.labels),
            "val": (data.splits.val.images, data.splits.val.labels),
            "test": (data.splits.test.images, data.splits.test.labels)}
    for k, (x, y) in want.items():
        assert got[k].images.shape == x.shape, k
        assert torch.equal(got[k].images, x), f"{k}: decoded pixels differ from the source"
        assert torch.equal(got[k].labels, y), f"{k}: labels differ"
    m = b.meta
    assert m["write_mode"] == "raw" and not m["lossy"] and m["poison"]["kind"] == "classwise_noise"
    assert abs(m["poison"]["norms"]["linf"] * 255 - 8) < 1e-6
    assert m["fingerprint"]["clean_train_sha256"] == fingerprint(data.splits.train)


def test_a_split_read_over_several_batches_and_its_head_are_the_source_s(tmp_path):
    """read_split copies FFCV's batches (512 images each, buffers FFCV reuses) into one tensor of the split's size:
    every batch in its place, and a ``limit`` that ends inside a batch (the probe's head) takes exactly that many."""
    cfg = cfg_of(*SMALL, "--data.synthetic_train=1100", "--data.img_size=8", "--poison.kind=patch_noise")
    write_betons(cfg, tmp_path / "d", log=lambda m: None)
    data = build_data(cfg)
    b = B.BetonDir(tmp_path / "d")
    whole, head = b.read_split("train", num_workers=1), b.read_split("train", limit=600, num_workers=1)
    assert whole.images.shape == data.poisoned_train.shape and torch.equal(whole.images, data.poisoned_train)
    assert torch.equal(whole.labels, data.splits.train.labels)
    assert torch.equal(head.images, data.poisoned_train[:600]) and torch.equal(head.labels, whole.labels[:600])


def test_jpg_mode_warns_and_is_lossy(tmp_path):
    said = []
    write_betons(cfg_of(*SMALL, "--poison.kind=patch_noise"), tmp_path / "j", write_mode="jpg", jpeg_quality=50,
                   log=said.append)
    assert any("defense" in s and "JPEG" in s for s in said)
    b = B.BetonDir(tmp_path / "j")
    assert b.meta["lossy"] and b.meta["jpeg_quality"] == 50
    x = b.read_split("train", num_workers=1).images
    ref = build_data(cfg_of(*SMALL, "--poison.kind=patch_noise")).poisoned_train
    diff = (x.float() - ref.float()).abs()
    other = (x.float() - ref.roll(1, 0).float()).abs()  # each image against another one
    assert diff.max() > 0 and diff.mean() < 0.5 * other.mean()  # compressed, still the same images


def test_trainer_consumes_beton_on_both_paths(tmp_path, synth_dir, capfd):
    base = [*TINY, "--train.epochs=1", "--data.source=beton", f"--data.root={synth_dir}"]
    s_ffcv = train(cfg_of(*base, f"--log.run_dir={tmp_path / 'f'}"))
    err = capfd.readouterr().err
    assert "[data] FFCV Loader" in err
    s_torch = train(cfg_of(*base, "--data.loader=torch", f"--log.run_dir={tmp_path / 't'}"))
    assert "[data] torch in-memory batches over the decoded .beton" in capfd.readouterr().err
    assert s_ffcv["steps"] == s_torch["steps"] == 300 // 32
    for s in (s_ffcv, s_torch):
        assert 0 <= s["final_test_acc"] <= 1 and np.isfinite(s["model_checksum"])
    train(cfg_of(*TINY, "--train.epochs=1", f"--log.run_dir={tmp_path / 'n'}"))
    assert "(the data is not a .beton)" in capfd.readouterr().err


def test_a_resume_refuses_betons_written_again_and_eval_notes_them(tmp_path, capfd):
    """The run records each .beton split's SHA-256 (meta.json's inputs.beton); betons written again in its data.root
    (here with a poison the run never saw) pass every check of the files themselves, so the resume must refuse them,
    naming data.root and the splits, and eval says its figure is of other data."""
    from pst_dist.cli import main

    root, run = tmp_path / "bt", tmp_path / "run"
    write_betons(cfg_of(*SMALL), root, log=lambda m: None)
    base = [*TINY, "--data.source=beton", f"--data.root={root}", f"--log.run_dir={run}"]
    train(cfg_of(*base, "--train.epochs=1"))
    recorded = json.loads((run / "meta.json").read_text())["inputs"]["beton"]
    assert recorded == {k: sha256(root / f"{k}.beton") for k in B.SPLITS}
    assert train(cfg_of(*base, "--train.epochs=2"), resume=True)["status"] == "finished"  # the same files: resumes
    write_betons(cfg_of(*SMALL, "--poison.kind=patch_noise"), root, overwrite=True, log=lambda m: None)
    before = (run / "config.toml").read_text(), sorted(p.name for p in run.iterdir())
    with pytest.raises(DataError, match=rf"data.root='{root}' is not what the run .* \(train.beton: "):
        train(cfg_of(*base, "--train.epochs=3"), resume=True)
    assert ((run / "config.toml").read_text(), sorted(p.name for p in run.iterdir())) == before
    capfd.readouterr()
    for how in ([], ["--data.verify=false"]):  # (a setting of how to read it is still the run's own data)
        assert main(["eval", "--run", str(run), *how]) == 0
        out, err = capfd.readouterr()
        assert "[eval] note: the .beton data is not what the run trained on (train.beton: " in err, err
        assert json.loads(out)["beton_as_trained"] is False


def test_a_resume_follows_betons_copied_to_another_path_and_refuses_other_files_there(tmp_path, capfd):
    """Betons copied to another path (a node's local SSD, another mount) are the run's data: its recorded SHA-256s
    say so, so the resume goes on from there and trains as it would have at the first path (was: refused for the
    changed data.root; read into memory here, data.loader=torch: FFCV's own augmentation is not bit-identical
    across a resume). Other files at a new path are refused before the run writes anything, data.verify=false or
    not. The change is recorded (meta.json), config.toml names the path that trains from now on, and
    other files at a new path are refused before the run writes anything."""
    first, copy, other, run, kept = (tmp_path / n for n in ("first", "copy", "other", "run", "kept"))
    write_betons(cfg_of(*SMALL), first, log=lambda m: None)
    base = [*TINY, "--data.source=beton", "--data.loader=torch", f"--log.run_dir={run}"]
    train(cfg_of(*base, f"--data.root={first}", "--train.epochs=1"))
    shutil.copytree(run, kept)  # the same run resumed where its data was, for the reference
    shutil.copytree(first, copy)
    capfd.readouterr()
    moved = train(cfg_of(*base, f"--data.root={copy}", "--train.epochs=2"), resume=True)
    assert moved["status"] == "finished"
    assert f"[resume] data.root moved: '{first}' -> '{copy}'" in capfd.readouterr().err
    assert json.loads((run / "meta.json").read_text())["resumes"][-1]["changes"]["data.root"] == [str(first), str(copy)]
    assert load_config(run / "config.toml", recorded=True).data.root == str(copy)
    stayed = train(cfg_of(*base, f"--log.run_dir={kept}", f"--data.root={first}", "--train.epochs=2"), resume=True)
    assert moved["model_checksum"] == stayed["model_checksum"] and moved["test_curve"] == stayed["test_curve"]
    write_betons(cfg_of(*SMALL, "--poison.kind=patch_noise"), other, log=lambda m: None)
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    with pytest.raises(DataError, match=rf"data.root='{other}' is not what the run .* \(train.beton: "):
        train(cfg_of(*base, f"--data.root={other}", "--train.epochs=3"), resume=True)
    # the run's beton.json beside a train.beton of the same size with other pixels: at another path the files are
    # hashed even with data.verify=false (beton.json's figures alone vouched for them)
    swapped = Path(shutil.copytree(first, tmp_path / "swapped"))
    _flip_pixel_bytes(swapped / "train.beton")
    with pytest.raises(DataError, match=rf"data.root='{swapped}' is not what the run .* \(train.beton: "):
        train(cfg_of(*base, f"--data.root={swapped}", "--train.epochs=3", "--data.verify=false"), resume=True)
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before


def test_beton_source_refuses_a_second_poison(synth_dir):
    with pytest.raises(DataError, match="already holds its poison"):
        build_data(cfg_of("--data.source=beton", f"--data.root={synth_dir}", "--poison.kind=patch_noise"))


@pytest.mark.multiproc
def test_two_ranks_shard_one_epoch_each_sample_once(tmp_path):
    n = 203  # odd, and not a multiple of the batch: exercises both remainders
    d = tmp_path / "ids"
    d.mkdir()
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.integers(0, 256, (n, 3, 8, 8), dtype=np.uint8))
    ids = torch.arange(n)
    for k in B.SPLITS:
        B.write_split(d / f"{k}.beton", x, ids, num_workers=1)
    meta = {"format": B.FORMAT, "shape": [3, 8, 8], "write_mode": "raw", "lossy": False, "source": "ids",
            "num_classes": n, "mean": [0.5] * 3, "std": [0.3] * 3,
            "splits": {k: {"num_samples": n, "bytes": (d / f"{k}.beton").stat().st_size,
                           "sha256": sha256(d / f"{k}.beton")} for k in B.SPLITS}}
    (d / B.META).write_text(json.dumps(meta))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(Path(__file__).parent / "beton_shard_worker.py"), str(d), str(tmp_path)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=child_env())
    assert out.returncode == 0, out.stderr[-3000:]
    r = [json.loads((tmp_path / f"shard{k}.json").read_text()) for k in (0, 1)]
    full = r[0]["False"] + r[1]["False"]
    assert len(full) == len(set(full)) == n - n % 2, "without drop_last: every sample once, less n mod 2"
    assert not set(r[0]["False"]) & set(r[1]["False"])
    kept = r[0]["True"] + r[1]["True"]
    per_rank = (n // 2) // 16 * 16  # drop_last drops each rank's partial batch
    assert len(kept) == len(set(kept)) == 2 * per_rank and r[0]["len_True"] == per_rank // 16
    # same permutation as the torch path (TensorBatches) for the same seed and epoch
    from pst_dist.data.loaders import TensorBatches

    tb = [TensorBatches(x, ids, 16, seed=3, rank=k, world_size=2) for k in (0, 1)]
    for k in (0, 1):
        tb[k].set_epoch(2)
        assert [int(v) for _, y in tb[k] for v in y] == r[k]["False"]


# --------------------------------------------------------------------------------------------------------------
# bad input: clear errors, nothing half-written


def test_truncated_foreign_and_missing_files(tmp_path, synth_dir):
    d = tmp_path / "copy"
    shutil.copytree(synth_dir, d)
    with open(d / "train.beton", "r+b") as f:
        f.truncate((d / "train.beton").stat().st_size // 2)
    with pytest.raises(DataError, match="truncated"):
        B.BetonDir(d)
    with pytest.raises(DataError, match="truncated"):  # also without beton.json's size to compare against
        B.check_beton(d / "train.beton")
    (d / "train.beton").write_bytes(b"not a beton" * 100)
    with pytest.raises(DataError, match="train.beton"):
        B.check_beton(d / "train.beton")
    from ffcv.fields import IntField, NDArrayField
    from ffcv.writer import DatasetWriter

    w = DatasetWriter(str(d / "train.beton"), {"img": NDArrayField(np.dtype("uint8"), (4,)), "target": IntField()},
                      num_workers=1)
    w.from_indexed_dataset([(np.zeros(4, np.uint8), 1)] * 3)
    with pytest.raises(DataError, match="foreign .beton.*found"):
        B.check_beton(d / "train.beton")
    shutil.copy(synth_dir / "train.beton", d / "train.beton")
    B.BetonDir(d)  # intact again
    (d / "val.beton").unlink()
    with pytest.raises(DataError, match="missing split file.*val.beton"):
        B.BetonDir(d)
    with pytest.raises(DataError, match="not found"):
        B.BetonDir(tmp_path / "nowhere")
    (tmp_path / "plain").mkdir()
    with pytest.raises(DataError, match="no beton.json"):
        B.BetonDir(tmp_path / "plain")


def _flip_pixel_bytes(beton: Path, n: int = 64) -> None:
    from ffcv.reader import Reader

    ptr = int(Reader(str(beton)).metadata["f0"]["data_ptr"][0])  # sample 0's raw pixels
    with open(beton, "r+b") as f:
        f.seek(ptr)
        pixels = f.read(n)
        f.seek(ptr)
        f.write(bytes(b ^ 0xFF for b in pixels))


def test_verify_false_skips_only_the_hash(tmp_path, synth_dir):
    d = tmp_path / "copy"
    shutil.copytree(synth_dir, d)
    _flip_pixel_bytes(d / "train.beton")
    with pytest.raises(DataError, match=r"train.beton: changed since it was written.*1 s per GB.*--data.verify=false"):
        B.BetonDir(d)
    assert len(B.BetonDir(d, verify=False)) == 300  # same size and structure: only the hash tells
    with open(d / "val.beton", "r+b") as f:
        f.truncate((d / "val.beton").stat().st_size - 1)
    with pytest.raises(DataError, match="val.beton.*truncated"):
        B.BetonDir(d, verify=False)


@pytest.mark.parametrize("change, match", [
    ("[1, 2]", "beton.json is not a JSON object"),
    ("{", "beton.json is not valid JSON"),
    ({"num_classes": 1}, r"key 'num_classes' = 1: expected an integer >= 2"),
    ({"std": [0.2, 0.0, 0.2]}, r"key 'std' = \[0.2, 0.0, 0.2\]: expected 3 finite numbers .* each > 0"),
    ({"std": [float("nan")] * 3}, r"key 'std' = \[nan, nan, nan\]"),
    ({"mean": [float("inf")] * 3}, r"key 'mean' = \[inf, inf, inf\]"),
    ({"mean": [0.5]}, r"key 'mean' = \[0.5\]: expected 3 finite numbers"),
    ({"std": None}, r"key 'std' = None"),
    ({"shape": [3, 16]}, r"key 'shape' = \[3, 16\]: expected 3 positive integers"),
    ({"shape": [3, 16, "16"]}, r"key 'shape' = \[3, 16, '16'\]"),
    ({"splits": {"train": {}}}, r"key 'splits.train.num_samples' = None"),
    ({"splits": None}, r"key 'splits' = None"),
    ({"format": "other/1"}, r"key 'format' = 'other/1'"),
    ({"write_mode": "png"}, r"key 'write_mode' = 'png'"),
])
def test_beton_json_values_are_validated(tmp_path, synth_dir, change, match):
    d = tmp_path / "copy"
    shutil.copytree(synth_dir, d)
    meta = json.loads((d / B.META).read_text())
    (d / B.META).write_text(change if isinstance(change, str) else json.dumps({**meta, **change}))
    with pytest.raises(DataError, match=match) as e:
        B.BetonDir(d)
    assert str(d / B.META) in str(e.value) and "\n" not in str(e.value)


def test_interrupted_write_leaves_nothing_and_keeps_the_old_directory(tmp_path, synth_dir, monkeypatch):
    out = tmp_path / "out"
    shutil.copytree(synth_dir, out)
    before = (out / B.META).read_text()
    real = B.write_split
    calls = []

    def dies_on_test_split(path, *a, **k):
        calls.append(path.name)
        if path.name == "test.beton":
            raise KeyboardInterrupt
        return real(path, *a, **k)

    monkeypatch.setattr(B, "write_split", dies_on_test_split)
    with pytest.raises(KeyboardInterrupt):
        write_betons(cfg_of(*SMALL), out, overwrite=True, log=lambda m: None)
    assert calls == ["train.beton", "val.beton", "test.beton"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"], "a partial directory was left behind"
    assert (out / B.META).read_text() == before


def test_full_disk_stops_the_ffcv_writer(tmp_path, synth_dir):
    """A write that fails inside an FFCV writer process (a full disk; here a file size limit: EFBIG) is raised at
    once, naming --out, where FFCV 1.0.2's own loop waits forever for the dead worker's samples; the earlier output
    is unchanged and nothing partial is left. (The CLI side, for `pst-dist poison`: test_bad_files.)"""
    import resource
    import signal

    out = tmp_path / "out"
    shutil.copytree(synth_dir, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def hung(*_):
        raise TimeoutError("write_betons still running after 120 s: the FFCV writer hangs on a failed worker")

    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGALRM, hung)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, hard))  # train.beton needs 4 MiB; Python ignores SIGXFSZ
    signal.alarm(120)
    try:
        with pytest.raises(OSError, match="writing it failed: File too large") as e:
            write_betons(cfg_of(*SMALL), out, overwrite=True, log=lambda m: None)
    finally:
        signal.alarm(0)
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGALRM, previous)
    assert str(out) in str(e.value)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"], "a partial directory was left behind"


def test_poison_shape_mismatch_writes_nothing(tmp_path):
    bad = tmp_path / "p.npy"
    np.save(bad, np.zeros((359, 3, 15, 16), np.float32))  # synthetic source: 300 + 60 images of 3 x 16 x 16
    cfg = cfg_of(*SMALL, "--poison.kind=file", f"--poison.path={bad}")
    want = r"expected \(rows, C, H, W\) = \(rows, 3, 16, 16\).*N = 360.*found \(359, 3, 15, 16\)"
    with pytest.raises(PoisonFileError, match=want):
        write_betons(cfg, tmp_path / "out", log=lambda m: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.npy"]


def test_cli_write_beton_errors_exit_2(tmp_path, capsys):
    from pst_dist.cli import main

    assert main(["write-beton", "--out", str(tmp_path / "o"), *SMALL, "--poison.kind=file",
                 f"--poison.path={tmp_path / 'missing.npy'}"]) == 2
    assert "missing.npy" in (err := capsys.readouterr().err), err  # the error names the file
    assert not (tmp_path / "o").exists()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the kernel's parent-death signal is Linux's")
def test_the_ffcv_writer_processes_end_with_a_killed_write_beton(tmp_path):
    """`write-beton` killed (-9, as the OOM killer does, which picks the process holding the data) while FFCV's
    writer processes write: they end with it (were left blocked forever on its queues, each holding memory)."""
    import time

    from .conftest import outliving, started, workers_of

    cmd = [sys.executable, "-m", "pst_dist.cli", "write-beton", "--data.source=synthetic",
           "--data.synthetic_train=40000", "--data.val_size=60", "--data.img_size=32", "--out", str(tmp_path / "b")]
    with started(cmd, "write-beton") as (proc, writers):
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None and len(writers) < 2:
            writers[:] = workers_of(proc.pid)
            time.sleep(0.02)
        assert proc.poll() is None and len(writers) >= 2, "no FFCV writer processes seen while writing"
        proc.kill()
        proc.wait(timeout=60)
        assert not outliving(writers), "an FFCV writer process outlived write-beton"
