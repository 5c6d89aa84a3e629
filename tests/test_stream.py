"""data.stream: an image folder's training split read batch by batch from its files (DataLoader workers decoding
ahead) gives the batches, the normalisation and the run an in-memory read gives, bit for bit; what cannot stream
is refused naming the setting, and a bad file is refused before the run writes anything."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pst_dist.config import ConfigError, DataConfig, load_config
from pst_dist.data import pipeline
from pst_dist.data.loaders import FolderBatches, TensorBatches
from pst_dist.data.pipeline import build_data, build_loader, streams
from pst_dist.data.sources import DataError, PixelSums, channel_stats, folder_stats, load_splits, load_streamed_splits
from pst_dist.distributed import DistInfo
from tests.conftest import child_env, run_cli


def write_folder(root: Path, n_train: int = 24, n_test: int = 8, classes: int = 3) -> Path:
    """A real image folder: PNG and JPEG files of several sizes (resized and center-cropped when read), classes as
    subfolders; each class a different mean brightness so a tiny model learns something."""
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("val", n_test)):
        for c in range(classes):
            d = root / split / f"c{c}"
            d.mkdir(parents=True)
            for i in range(n):
                h, w = rng.integers(18, 40, 2)
                px = np.clip(rng.normal(60 + 60 * c, 40, (h, w, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(px).save(d / f"{i:03d}.{'jpg' if i % 3 == 0 else 'png'}")
    return root


def cfg_of(root: Path, *over: str):
    return load_config(None, [f"--data.root={root}", "--data.source=imagefolder", "--data.img_size=16",
                              "--data.val_size=6", "--data.probe_size=8", "--data.loader_workers=2",
                              "--model.width=0.125", "--train.batch_size=8", "--train.epochs=2",
                              "--log.progress=false", *over])


def reference_splits(root: Path, d: DataConfig) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The folder read as the imagefolder source always has, written out: every file of train/ and val/ in sorted
    class and file order, decoded with PIL and torchvision, then the shuffles and cuts of load_splits."""
    from torchvision.transforms import functional as F

    classes = sorted(p.name for p in (root / "train").iterdir())

    def read(split: str) -> tuple[torch.Tensor, torch.Tensor]:
        xs, ys = [], []
        for ci, c in enumerate(classes):
            for f in sorted((root / split / c).iterdir()):
                with Image.open(f) as im:
                    im = F.center_crop(F.resize(im.convert("RGB"), d.img_size), [d.img_size, d.img_size])
                xs.append(torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1))
                ys.append(ci)
        return torch.stack(xs), torch.tensor(ys)

    (tx, ty), (sx, sy) = read("train"), read("val")
    g = torch.Generator().manual_seed(d.seed)
    perm = torch.randperm(len(ty), generator=g)
    tx, ty = tx[perm], ty[perm]
    if d.val_from == "train":
        (vx, vy), (tx, ty) = (tx[:d.val_size], ty[:d.val_size]), (tx[d.val_size:], ty[d.val_size:])
    else:
        perm = torch.randperm(len(sy), generator=g)
        sx, sy = sx[perm], sy[perm]
        (vx, vy), (sx, sy) = (sx[:d.val_size], sy[:d.val_size]), (sx[d.val_size:], sy[d.val_size:])
    cut = lambda x, n: x[:n] if n else x  # noqa: E731
    return {"train": (cut(tx, d.train_size), cut(ty, d.train_size)), "val": (vx, vy),
            "test": (cut(sx, d.test_size), cut(sy, d.test_size))}


@pytest.mark.parametrize("batch", [256, 16], ids=["this-process", "decoding-processes"])
@pytest.mark.parametrize("val_from, train_size", [("train", 0), ("test", 50)])
def test_streamed_and_in_memory_splits_are_the_folder_as_always_read(tmp_path, val_from, train_size, batch,
                                                                    monkeypatch):
    """(batch: the in-memory read hands a split of more than ``batch`` images to data.loader_workers decoding
    processes, which must give the same tensor)"""
    from pst_dist.data import sources

    monkeypatch.setattr(sources, "DECODE_BATCH", batch)
    calls, decoded = [], sources.decoded
    monkeypatch.setattr(sources, "decoded", lambda *a, **k: calls.append(a[2]) or decoded(*a, **k))
    root = write_folder(tmp_path / "folder")
    d = DataConfig(source="imagefolder", root=str(root), img_size=16, val_size=6, val_from=val_from,
                   train_size=train_size, test_size=20)
    ref = reference_splits(root, d)
    whole = load_splits(d)
    head, files = load_streamed_splits(d, head=10)
    for name, (x, y) in ref.items():
        got = getattr(whole, name)
        assert torch.equal(got.images, x) and torch.equal(got.labels, y), name
    assert torch.equal(files.decode().images, ref["train"][0]) and torch.equal(files.labels, ref["train"][1])
    assert torch.equal(files.index, whole.train.index)
    assert torch.equal(head.train.images, ref["train"][0][:10]) and len(head.train) == 10
    for part in ("val", "test"):
        a, b = getattr(head, part), getattr(whole, part)
        assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels) and torch.equal(a.index, b.index)
    assert head.source_train_size == whole.source_train_size == 72
    assert (calls and set(calls) == {2}) if batch == 16 else not calls  # data.loader_workers processes, or none


def test_pixel_sums_are_exact_in_any_batching():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (301, 3, 9, 9), generator=g, dtype=torch.uint8)
    ref = x.double().div(255)
    mean, std = ref.mean(dim=(0, 2, 3)).float(), ref.std(dim=(0, 2, 3)).float()
    whole = folder_stats(x)
    parts = PixelSums(3)
    for chunk in x.split(7):
        parts.add(chunk)
    assert all(torch.equal(a, b) for a, b in zip(whole, parts.stats(), strict=True))
    assert torch.equal(whole[0], mean) and torch.allclose(whole[1], std, rtol=0, atol=1e-7)
    assert torch.allclose(whole[0], channel_stats(x)[0], atol=1e-6)  # float32 figures, to their precision
    with pytest.raises(DataError, match="channel 1 has std 0"):
        blank = x.clone()
        blank[:, 1] = 7
        folder_stats(blank)


@pytest.mark.parametrize("augment", ["none", "crop", "crop_flip", "rrc_flip", "ueraser"])
def test_streamed_batches_are_the_in_memory_batches(tmp_path, augment):
    root = write_folder(tmp_path / "folder")
    memory = build_data(cfg_of(root, "--data.stream=false"))
    streamed = build_data(cfg_of(root, "--data.stream=true"))
    assert memory.stream is None and streamed.stream is not None
    assert torch.equal(streamed.mean, memory.mean) and torch.equal(streamed.std, memory.std)
    assert torch.equal(streamed.poisoned_train, memory.poisoned_train[:len(streamed.poisoned_train)])
    for world_size in (1, 2):
        for rank in range(world_size):
            kw = dict(augment=augment, seed=3, drop_last=True, rank=rank, world_size=world_size)
            a = TensorBatches(memory.poisoned_train, memory.splits.train.labels, 8, prefetch=2, **kw)
            b = FolderBatches(streamed.stream, 8, workers=2, prefetch=0, **kw)
            assert len(a) == len(b) > 0
            for epoch in (0, 1):
                a.set_epoch(epoch)
                b.set_epoch(epoch)
                pairs = list(zip(a, b, strict=True))
                assert len(pairs) == len(a)
                assert all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in pairs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the pinned, side-stream copy runs on a GPU only")
def test_cuda_streamed_batches_are_the_in_memory_batches(tmp_path):
    """On a GPU the streamed batches take TensorBatches' pinned-memory copy on a side stream (prefetch thread) and
    are augmented there: the same batches as the in-memory set, held on the device or copied per batch."""
    root = write_folder(tmp_path / "folder")
    memory = build_data(cfg_of(root, "--data.stream=false"))
    streamed = build_data(cfg_of(root, "--data.stream=true"))
    kw = dict(augment="rrc_flip", seed=3, drop_last=True, device=torch.device("cuda", 0))
    loaders = [TensorBatches(memory.poisoned_train, memory.splits.train.labels, 8, prefetch=2, on_device=on, **kw)
               for on in (False, True)]
    loaders.append(FolderBatches(streamed.stream, 8, workers=2, prefetch=2, **kw))
    for epoch in (0, 1):
        runs = []
        for loader in loaders:
            loader.set_epoch(epoch)
            batches = list(loader)
            assert all(x.device == y.device == kw["device"] for x, y in batches)
            runs.append([(x.cpu(), y.cpu()) for x, y in batches])
        assert len(runs[0]) == len(loaders[0]) > 0
        for other in runs[1:]:
            assert all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(runs[0], other, strict=True))


def test_streaming_auto_follows_the_memory_available(tmp_path, monkeypatch):
    root = write_folder(tmp_path / "folder")
    cfg = cfg_of(root)
    assert cfg.data.stream == "auto" and not streams(cfg)  # 66 images of 16 x 16: far under a quarter of memory
    need = (72 - 6) * 3 * 16 * 16
    monkeypatch.setattr(pipeline, "available_memory", lambda: 4 * need - 4)
    assert streams(cfg)
    data = build_data(cfg)
    loader = build_loader(cfg, data, DistInfo(0, 1, 0), torch.device("cpu"))
    assert isinstance(loader, FolderBatches) and len(loader) == 66 // 8
    assert not streams(cfg_of(root, "--poison.kind=classwise_noise"))  # a poison is made in memory
    monkeypatch.setattr(pipeline, "available_memory", lambda: 4 * need)
    assert not streams(cfg)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # two processes on this node, a copy each
    assert streams(cfg)
    with pytest.raises(ConfigError, match=r"data.on_device=true: data.stream=auto streams .* data.stream=false"):
        streams(cfg_of(root, "--data.on_device=true", "--train.device=cuda"))  # asked for on the GPU; does not fit
    assert streams(cfg_of(root, "--data.on_device=true", "--train.device=cpu"))  # on_device never applies there
    assert not streams(cfg_of(root, "--data.on_device=true", "--data.stream=false"))


@pytest.mark.parametrize("over, message", [
    (["--data.source=synthetic"], "data.stream=true: only data.source='imagefolder' streams"),
    (["--poison.kind=classwise_noise"], "data.stream=true with poison.kind='classwise_noise'"),
    (["--defense.kind=jpeg"], "data.stream=true with defense.kind='jpeg'"),
    (["--data.source=beton"], "data.stream=true: only data.source='imagefolder' streams (found 'beton'"),
    (["--data.on_device=true"], "data.stream=true with data.on_device=true: a streamed training split stays on disk"),
])
def test_what_cannot_stream_is_refused_naming_the_setting(tmp_path, over, message):
    root = write_folder(tmp_path / "folder", n_train=4, n_test=2)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        build_data(cfg_of(root, "--data.stream=true", *over))
    with pytest.raises(ConfigError, match="data.stream='yes'"):
        cfg_of(root, "--data.stream=yes")


@pytest.mark.parametrize("defense", ["ueraser", "adv"])
def test_a_defense_that_acts_on_each_batch_streams(tmp_path, defense):
    root = write_folder(tmp_path / "folder", n_train=4, n_test=2)
    assert build_data(cfg_of(root, "--data.stream=true", f"--defense.kind={defense}")).stream is not None


def test_a_streamed_run_is_the_in_memory_run(tmp_path):
    """End to end through the CLI, PST stages included: the same metrics, accuracies and weights."""
    root = write_folder(tmp_path / "folder")
    pst = ['--schedule.stages=[{name="warm",epochs=1},{name="frozen",freeze=[0,1]}]', "--data.augment=crop_flip"]
    out = {}
    for stream in ("false", "true"):
        run = tmp_path / f"run_{stream}"
        r = run_cli("train", f"--data.root={root}", "--data.source=imagefolder", "--data.img_size=16",
                    "--data.val_size=6", "--data.probe_size=8", "--model.width=0.125", "--train.batch_size=8",
                    "--train.epochs=2", "--log.progress=false", f"--data.stream={stream}", f"--log.run_dir={run}",
                    "--log.tensorboard=false", *pst)
        assert r.returncode == 0, r.stderr[-3000:]
        out[stream] = (json.loads((run / "summary.json").read_text()),
                       [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()],
                       json.loads((run / "meta.json").read_text()))
        assert out[stream][2]["resolved"]["data.stream"] is (stream == "true")
    (a, ma, _), (b, mb, _) = out["false"], out["true"]
    assert "streamed from" in r.stderr and "mean/std" not in r.stderr  # progress off: no bar
    drop = ("throughput",)
    assert {k: v for k, v in a.items() if k not in drop} == {k: v for k, v in b.items() if k not in drop}
    timing = ("perf/", "time")
    strip = lambda rows: [{k: v for k, v in row.items() if not k.startswith(timing)} for row in rows]  # noqa: E731
    assert strip(ma) == strip(mb) and sum("train/loss" in row for row in ma) == 2
    wa, wb = (torch.load(tmp_path / f"run_{k}" / "checkpoint.pt", map_location="cpu", weights_only=True)["model"]
              for k in ("false", "true"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    # pst-dist eval of the streamed run: its recorded normalisation, no pass over the training files
    r = run_cli("eval", "--run", tmp_path / "run_true")
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout)["accuracy"] == b["final_test_acc"] and "streaming" not in r.stderr


def test_a_bad_file_is_refused_before_the_run_writes_anything(tmp_path):
    root = write_folder(tmp_path / "folder", n_train=6, n_test=2)
    bad = root / "train" / "c1" / "004.png"
    bad.write_bytes(b"not a png at all")
    run = tmp_path / "run"
    r = run_cli("train", f"--data.root={root}", "--data.source=imagefolder", "--data.img_size=16",
                "--data.val_size=2", "--data.probe_size=4", "--model.width=0.125", "--train.batch_size=4",
                "--log.progress=false", "--data.stream=true", f"--log.run_dir={run}")
    assert r.returncode != 0
    assert "004.png" in r.stderr and "cannot decode image" in r.stderr and "Traceback" not in r.stderr
    assert not run.exists() or not any(run.iterdir())


def test_write_beton_streams_a_folder_to_the_files_an_in_memory_read_writes(tmp_path):
    """The .beton files hold the same pixels and labels, and beton.json the same fingerprint, statistics and norms,
    whether the folder was read into memory or file by file."""
    from pst_dist.data import beton as B
    from pst_dist.data.pipeline import write_betons

    root = write_folder(tmp_path / "folder")
    metas = {}
    for stream in ("false", "true"):
        out = tmp_path / f"beton_{stream}"
        metas[stream] = write_betons(cfg_of(root, f"--data.stream={stream}"), out, log=lambda m: None)
    a, b = B.BetonDir(tmp_path / "beton_false"), B.BetonDir(tmp_path / "beton_true")
    for k in B.SPLITS:
        x, y = a.read_split(k, num_workers=1), b.read_split(k, num_workers=1)
        assert torch.equal(x.images, y.images) and torch.equal(x.labels, y.labels), k
    drop = ("splits", "written_at", "seconds", "data_config")
    ma, mb = ({k: v for k, v in m.items() if k not in drop} for m in (metas["false"], metas["true"]))
    assert ma == mb and ma["poison"]["norms"]["linf"] == 0
    hashes = {k: [s["sha256"] for s in m["splits"].values()] for k, m in metas.items()}
    assert hashes["false"] == hashes["true"]


def test_diagnose_probes_a_streamed_folder_with_as_many_images_as_asked(tmp_path):
    root = write_folder(tmp_path / "folder", n_train=40, n_test=4)  # 114 training images; 64 held in memory
    r = run_cli("diagnose", f"--data.root={root}", "--data.source=imagefolder", "--data.img_size=16",
                "--data.val_size=6", "--data.probe_size=8", "--model.width=0.125", "--train.batch_size=16",
                "--train.epochs=1", "--log.progress=false", "--log.tensorboard=false", "--data.stream=true",
                "--standard", "--probe-size=100", "--out", tmp_path / "diag")
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "diag" / "diagnose.jsonl").read_text().splitlines()]
    assert [row["probe_images"] for row in rows] == [100, 100]


@pytest.mark.parametrize("val_from", ["train", "test"])
@pytest.mark.parametrize("cuts", [(0, 0), (30, 7), (500, 500)])
def test_carve_gives_the_rows_of_the_shuffle_and_subset_chain(val_from, cuts):
    """The carving as rows equals the chain of shuffles and subsets load_splits ran before it (written out here)."""
    from pst_dist.data.sources import Split, carve

    n_train, n_test, val_size = 60, 25, 5
    train_size, test_size = cuts
    d = DataConfig(val_size=val_size, val_from=val_from, train_size=train_size, test_size=test_size, seed=4)
    tr = Split(torch.zeros(n_train, 1, 1, 1, dtype=torch.uint8), torch.zeros(n_train, dtype=torch.int64))
    te = Split(torch.zeros(n_test, 1, 1, 1, dtype=torch.uint8), torch.zeros(n_test, dtype=torch.int64))
    g = torch.Generator().manual_seed(4)
    tr = tr.subset(torch.randperm(n_train, generator=g))
    if val_from == "train":
        val, tr = tr.subset(torch.arange(val_size)), tr.subset(torch.arange(val_size, n_train))
    else:
        te = te.subset(torch.randperm(n_test, generator=g))
        val, te = te.subset(torch.arange(val_size)), te.subset(torch.arange(val_size, n_test))
    if train_size:
        tr = tr.subset(torch.arange(min(train_size, len(tr))))
    if test_size:
        te = te.subset(torch.arange(min(test_size, len(te))))
    rows = carve(d, n_train, n_test)
    assert torch.equal(rows.train, tr.index) and torch.equal(rows.val, val.index) and torch.equal(rows.test, te.index)


def test_a_file_that_changes_after_listing_stops_the_run_naming_it(tmp_path):
    """Mid-run: the statistics pass read one version of the folder; a file that changes afterwards is refused (a
    DataError naming it, raised through the decoding process and the prefetch thread), not trained on."""
    from pst_dist.train import train

    root = write_folder(tmp_path / "folder")
    cfg = cfg_of(root, "--data.stream=true", f"--log.run_dir={tmp_path / 'run'}", "--log.tensorboard=false")
    data = build_data(cfg)
    victim = data.stream.path(len(data.stream) - 1)
    st = victim.stat()
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    with pytest.raises(DataError, match=f"{victim.name}: the file changed after pst-dist listed the folder"):
        train(cfg, data=data)


def test_resume_may_switch_between_streamed_and_in_memory(tmp_path, capfd):
    """One epoch in memory, the second streamed: the same run as two epochs in memory (weights and metrics). The
    streamed segment, resumed on a folder that lists as it did, takes the recorded mean/std and makes no statistics
    pass (the first segment decoded every file)."""
    from pst_dist.train import train

    root = write_folder(tmp_path / "folder")
    out = {}
    for name, parts in (("whole", [("false", False, None)]), ("switched", [("false", False, 1), ("true", True, None)])):
        run = tmp_path / name
        for stream, resume, stop in parts:
            cfg = cfg_of(root, f"--data.stream={stream}", f"--log.run_dir={run}", "--log.tensorboard=false")
            capfd.readouterr()
            summary = train(cfg, resume=resume, stop_after_epochs=stop)
        out[name] = summary, torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=True)["model"]
    err = capfd.readouterr().err
    assert "the folder lists as when the run started" in err and "one pass first" not in err
    (a, wa), (b, wb) = out["whole"], out["switched"]
    assert a["model_checksum"] == b["model_checksum"] and a["test_curve"] == b["test_curve"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    meta = json.loads((tmp_path / "switched" / "meta.json").read_text())
    assert meta["resolved"]["data.stream"] is False and meta["resumes"][0]["resolved"]["data.stream"] is True
    assert meta["resumes"][0]["changes"] == {"data.stream": [False, True]}


def test_a_streamed_cpu_run_says_when_its_threads_and_decoders_oversubscribe_the_cores(tmp_path, monkeypatch, capsys):
    from pst_dist.data.pipeline import cpu_share, oversubscribed

    assert oversubscribed(1, 1, 2) == "" and oversubscribed(2, 2, 8) == "" and oversubscribed(3, 1, 4) == ""
    assert "share 2 cores" in oversubscribed(2, 1, 2) and "train.threads=1" in oversubscribed(2, 1, 2)
    assert "share 4 cores" in oversubscribed(4, 2, 4) and "train.threads=2" in oversubscribed(4, 2, 4)
    assert "train.threads=1" in oversubscribed(1, 3, 2)  # never fewer than one thread
    whole = len(os.sched_getaffinity(0)) == os.cpu_count()
    for launcher in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE"):  # torchrun / Ray Train, the deepspeed launcher
        monkeypatch.setenv(launcher, "2")
        assert cpu_share() == (max(1, os.cpu_count() // 2) if whole else len(os.sched_getaffinity(0)))
        monkeypatch.delenv(launcher)
    root = write_folder(tmp_path / "folder")
    cfg = cfg_of(root, "--data.stream=true", "--data.loader_workers=2")
    data = build_data(cfg)
    fits = torch.get_num_threads() + 2
    for share, said in ((fits - 1, True), (fits, False)):
        monkeypatch.setattr(pipeline, "cpu_share", lambda share=share: share)
        capsys.readouterr()
        build_loader(cfg, data, DistInfo(0, 1, 0), torch.device("cpu"))
        [line] = [x for x in capsys.readouterr().err.splitlines() if x.startswith("[data] torch batches streamed")]
        assert (f"decoding processes share {fits - 1} cores" in line) == said, line


@pytest.mark.parametrize("stream", ["false", "true"])
def test_a_resume_refuses_a_folder_changed_since_the_run_started(tmp_path, stream):
    """Each segment lists the folder afresh: a file touched, added or removed between two segments is refused at the
    resume, naming data.root, before the run writes anything."""
    from pst_dist.train import train

    root = write_folder(tmp_path / "folder")
    run = tmp_path / "run"
    over = [f"--data.stream={stream}", f"--log.run_dir={run}", "--log.tensorboard=false"]
    cfg = cfg_of(root, *over)
    train(cfg, stop_after_epochs=1)
    inputs = json.loads((run / "meta.json").read_text())["inputs"]
    assert inputs["folder"]["files"] == 72 + 24
    assert inputs["train_images"] == 72 - cfg.data.val_size * (cfg.data.val_from == "train")  # streamed or not
    before = {f.name: f.read_bytes() for f in run.iterdir() if f.is_file()}
    victim = root / "val" / "c1" / "002.png"  # a test file: what the run is judged on is its data too
    st = victim.stat()
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    with pytest.raises(DataError, match=rf"--resume: the image folder data.root='{root}' is not as this run "
                                        rf"started on it: the same files \(names, sizes\), but not all with the "
                                        rf"modification times recorded.*data.verify=false"):
        train(cfg, resume=True)
    (root / "train" / "c0" / "extra.png").write_bytes((root / "train" / "c0" / "001.png").read_bytes())
    with pytest.raises(DataError, match=r"files added, removed, renamed or resized \(96 files then, 97 now\)"):
        train(cfg, resume=True)
    with pytest.raises(DataError, match=r"files added, removed, renamed or resized \(96 files then, 97 now\)"):
        train(cfg_of(root, *over, "--data.verify=false"), resume=True)  # only mtimes may differ then
    assert {f.name: f.read_bytes() for f in run.iterdir() if f.is_file()} == before
    (root / "train" / "c0" / "extra.png").unlink()
    summary = train(cfg_of(root, *over, "--data.verify=false"), resume=True)  # the same files, touched
    assert summary["status"] == "finished"


def test_a_resume_keeps_an_image_folder_where_the_run_started(tmp_path):
    """An image folder's record is its listing (names, sizes, times), not its content: a copy at another data.root
    (even one that kept every time) is refused before the run writes anything, the refusal saying which paths may
    move (betons, poison files: content checked) and to keep the folder where it was."""
    import shutil

    from pst_dist.train import train

    first, run = write_folder(tmp_path / "first"), tmp_path / "run"
    over = ["--log.tensorboard=false", f"--log.run_dir={run}"]
    train(cfg_of(first, *over), stop_after_epochs=1)
    copy = Path(shutil.copytree(first, tmp_path / "copy"))  # copy2: the files' modification times kept
    before = {f.name: f.read_bytes() for f in run.iterdir() if f.is_file()}
    with pytest.raises(ConfigError, match=rf"data.root: '{first}' -> '{copy}'.*data.root may name another path only "
                                          rf"where the run recorded what the path held: .beton files, a poison read "
                                          rf"from files.*keep its data where it was"):
        train(cfg_of(copy, *over), resume=True)
    assert {f.name: f.read_bytes() for f in run.iterdir() if f.is_file()} == before


def test_eval_says_whether_the_folder_is_as_the_run_trained_on_it(tmp_path, capfd):
    """pst-dist eval goes on when the folder changed (it may be re-copied on purpose) but says so: in its JSON and
    in a note on stderr; other data (a data.* override) is not compared."""
    from pst_dist.evaluate import evaluate_run
    from pst_dist.train import train

    root = write_folder(tmp_path / "folder")
    run = tmp_path / "run"
    train(cfg_of(root, f"--log.run_dir={run}", "--log.tensorboard=false", "--train.epochs=1"))
    capfd.readouterr()
    first = evaluate_run(run)
    assert first["folder_as_trained"] is True and "[eval] note" not in capfd.readouterr().err
    victim = root / "val" / "c1" / "002.png"
    st = victim.stat()
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    touched = evaluate_run(run)
    assert touched["folder_as_trained"] is False and touched["accuracy"] == first["accuracy"]
    assert "the same files with other modification times" in capfd.readouterr().err
    (root / "val" / "c0" / "extra.png").write_bytes((root / "val" / "c0" / "001.png").read_bytes())
    assert evaluate_run(run)["folder_as_trained"] is False
    assert "files added, removed, renamed or resized: 96 files then, 97 now" in capfd.readouterr().err
    assert "folder_as_trained" not in evaluate_run(run, overrides=["--data.seed=1"])


def test_check_same_folder_passes_runs_from_before_it_was_recorded():
    from pst_dist.data.pipeline import check_same_folder

    d = load_config(None, ["--data.root=root"]).data
    now = {"sha256": "ab", "sizes_sha256": "s", "files": 3}
    for recorded in (None, {}, {"mean": [0.5]}):
        assert not check_same_folder(recorded, now, d)  # not a resume, or a run from before: no pass skipped
    assert check_same_folder({"folder": dict(now)}, now, d)
    assert not check_same_folder({"folder": dict(now)}, None, d)  # not an image folder now
    with pytest.raises(DataError, match=r"data.root='root'.*\(4 files then, 3 now\)"):
        check_same_folder({"folder": {"sha256": "cd", "sizes_sha256": "t", "files": 4}}, now, d)
    touched = {"folder": {**now, "sha256": "cd"}}
    with pytest.raises(DataError, match="modification times"):
        check_same_folder(touched, now, d)
    assert not check_same_folder(touched, now, load_config(None, ["--data.verify=false"]).data)


def _folder_rank(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    from pst_dist.data.pipeline import check_same_folder

    dist.init_process_group("gloo", rank=rank, world_size=2, init_method=f"tcp://127.0.0.1:{port}")
    now = {"sha256": "ab", "sizes_sha256": "s", "files": 3}
    was = now if rank == 0 else {**now, "sizes_sha256": "t", "sha256": "cd"}  # only rank 1's node differs
    try:
        check_same_folder({"folder": was}, now, load_config(None, ["--data.root=root"]).data)
        message = "passed"
    except DataError as e:
        message = str(e)
    dist.destroy_process_group()
    Path(out, f"rank{rank}.txt").write_text(message)


@pytest.mark.multiproc
def test_a_folder_changed_on_one_rank_is_refused_on_every_rank(tmp_path):
    """Node-local copies of a folder can differ on one node only: every rank refuses (none goes on to wait)."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_folder_rank, args=(port, str(tmp_path)), nprocs=2, start_method="spawn", join=True)
    assert "1 other rank(s) found the image folder data.root='root' changed" in (tmp_path / "rank0.txt").read_text()
    assert "files added, removed, renamed or resized (3 files then, 3 now)" in (tmp_path / "rank1.txt").read_text()


@pytest.mark.multiproc
def test_two_ranks_share_the_statistics_pass_and_train_as_in_memory(tmp_path):
    """torchrun, 2 processes on gloo: the streamed run (each rank decodes half the files for the statistics, the
    sums added up exactly across ranks; each rank streams its shard) equals the in-memory 2-process run."""
    import subprocess
    import sys

    root = write_folder(tmp_path / "folder")
    checksums = {}
    for stream in ("false", "true"):
        out = tmp_path / stream
        out.mkdir()
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(Path(__file__).parent / "dist_worker.py"), str(out), f"--data.root={root}",
               "--data.source=imagefolder", "--data.img_size=16", "--data.val_size=6", "--data.probe_size=8",
               "--model.width=0.125", "--train.batch_size=8", "--train.epochs=1", "--train.device=cpu",
               "--log.progress=false", "--log.tensorboard=false", f"--data.stream={stream}",
               f"--log.run_dir={out / 'run'}"]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                           env=child_env())
        assert r.returncode == 0, r.stderr[-3000:]
        ranks = [json.loads((out / f"rank{k}.json").read_text()) for k in (0, 1)]
        assert ranks[0]["model_checksum"] == ranks[1]["model_checksum"] and ranks[0]["world_size"] == 2
        checksums[stream] = ranks[0]["model_checksum"]
        if stream == "true":
            assert "(shared by 2 ranks)" in r.stderr and r.stderr.count("[data] streaming the 66") == 1
            inputs = json.loads((out / "run" / "meta.json").read_text())["inputs"]
            memory = build_data(cfg_of(root, "--data.stream=false"))
            assert inputs["mean"] == memory.mean.tolist() and inputs["std"] == memory.std.tolist()
    assert checksums["true"] == checksums["false"]


def test_a_resume_normalises_as_the_run_started(tmp_path, capfd):
    """A run whose recorded normalisation differs from what is computed now (an image folder run from before the
    exact sums) resumes with the recorded figures."""
    from pst_dist.train import train

    root = write_folder(tmp_path / "folder")
    run = tmp_path / "run"
    cfg = cfg_of(root, f"--log.run_dir={run}", "--log.tensorboard=false")
    train(cfg, stop_after_epochs=1)
    meta = json.loads((run / "meta.json").read_text())
    started = [m + 1e-7 for m in meta["inputs"]["mean"]]  # what float32 sums could have given
    meta["inputs"]["mean"] = started
    (run / "meta.json").write_text(json.dumps(meta))
    train(cfg, resume=True)
    resumed = json.loads((run / "meta.json").read_text())["resumes"][0]["inputs"]
    assert resumed["mean"] == torch.tensor(started).tolist()
    assert "normalising with the mean/std the run started with" in capfd.readouterr().err


def test_cgroup_room_reads_the_process_group_and_its_parents(tmp_path):
    from pst_dist.data.pipeline import _cgroup_room

    root = tmp_path / "cgroup"
    for d, limit, current in ((root, "max", 0), (root / "job", "1000", 300), (root / "job" / "step", "max", 100)):
        d.mkdir(parents=True, exist_ok=True)
        (d / "memory.max").write_text(f"{limit}\n")
        (d / "memory.current").write_text(f"{current}\n")
    proc = tmp_path / "cgroup_of_self"
    proc.write_text("4:memory:/elsewhere\n0::/job/step\n")
    assert _cgroup_room(root, proc) == [700]
    proc.write_text("4:memory:/\n")  # cgroup v1 only: no limit read
    assert _cgroup_room(root, proc) == []


def test_an_in_memory_read_whose_decoding_processes_fail_decodes_in_this_process(tmp_path, monkeypatch, capsys):
    """No processes or shared memory to be had (a container's 64 MB /dev/shm): the read goes on in this process, from
    the first image not yet decoded, and says so; the same tensor."""
    from pst_dist.data import sources

    root = write_folder(tmp_path / "folder")
    d = DataConfig(source="imagefolder", root=str(root), img_size=16, val_size=6)
    want = load_splits(d).train.images
    monkeypatch.setattr(sources, "DECODE_BATCH", 16)
    real = sources.decoded

    def failing(*a, **k):
        for i, item in enumerate(real(*a, **k)):
            if i == 2:
                raise RuntimeError("DataLoader worker (pid 1) is killed by signal: Bus error.")
            yield item

    monkeypatch.setattr(sources, "decoded", failing)
    capsys.readouterr()
    assert torch.equal(load_splits(d).train.images, want)
    assert "[data] decoding processes failed (DataLoader worker (pid 1) is killed by signal: Bus error.); decoding " \
           "the other 34 images in this process" in capsys.readouterr().err
