"""The training loop's speed contract: no step waits for the device except at logging points (every 50 steps and
the end of an epoch), the prefetching loader hands over the same batches as the synchronous one, and the loop
reports its throughput. Run as a script on a GPU machine for CUDA's own check:
``python tests/test_hot_loop.py`` (``torch.cuda.set_sync_debug_mode("error")`` on every other step)."""

from __future__ import annotations

import json
import sys
import threading
from pathlib import Path

import pytest
import torch

from pst_dist.config import load_config
from pst_dist.data.loaders import TensorBatches
from pst_dist.data.pipeline import build_data, build_loader
from pst_dist.distributed import DistInfo
from pst_dist.train import train

LOG_EVERY = 50
SMALL = ["--data.source=synthetic", "--data.synthetic_train=1024", "--data.val_size=64", "--data.img_size=16",
         "--data.probe_size=64", "--model.width=0.125", "--train.batch_size=8", "--train.epochs=2",
         "--log.progress=false", "--log.tensorboard=false", "--train.checkpoint_every=0"]
READS = ("item", "tolist", "numpy", "cpu", "__float__", "__int__", "__bool__", "__index__")


class StepWatch:
    """Wraps a loader; ``step`` is the trainer's step count the batch being trained will end at (None between
    epochs), so a read-back can be pinned to the step that made it."""

    def __init__(self, loader):
        self.loader, self.step, self.next_step = loader, None, 1

    def set_epoch(self, epoch: int) -> None:
        self.loader.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for batch in self.loader:
            self.step = self.next_step
            self.next_step += 1
            yield batch
        self.step = None


def watched_run(tmp_path, over: list[str], on_read):
    """Train with every device read-back on the main thread reported as ``on_read(method, step)``."""
    cfg = load_config(None, [*SMALL, *over, f"--log.run_dir={tmp_path / 'run'}"])
    data = build_data(cfg)
    watch = StepWatch(build_loader(cfg, data, DistInfo(0, 1, 0), torch.device(cfg.train.device if
                                                                              cfg.train.device != "auto" else "cpu")))
    main = threading.main_thread()
    originals = {name: getattr(torch.Tensor, name) for name in READS}

    def instrument(name):
        orig = originals[name]

        def read(self, *a, **k):
            if threading.current_thread() is main:
                on_read(name, watch.step)
            return orig(self, *a, **k)
        return read

    try:
        for name in READS:
            setattr(torch.Tensor, name, instrument(name))
        return train(cfg, data=data, loader=watch)
    finally:
        for name, orig in originals.items():
            setattr(torch.Tensor, name, orig)


def test_steps_read_nothing_back_except_at_logging_points(tmp_path):
    reads: list[tuple[str, int | None]] = []
    summary = watched_run(tmp_path, ["--train.device=cpu"], lambda name, step: reads.append((name, step)))
    steps = summary["steps"]
    assert steps > 2 * LOG_EVERY, "the run must span logging points and plain steps"
    in_steps = [(name, step) for name, step in reads if step is not None]
    bad = [(name, step) for name, step in in_steps if step % LOG_EVERY]
    assert not bad, f"device read-backs inside plain training steps: {bad[:10]}"
    assert {step for _, step in in_steps} == {s for s in range(LOG_EVERY, steps + 1, LOG_EVERY)}, \
        "the check itself must see the reads the logging steps make"


def test_prefetching_loader_hands_over_the_same_batches():
    x = torch.randint(0, 256, (200, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    y = torch.arange(200)
    for augment in ("crop_flip", "rrc_flip", "ueraser"):
        sync = TensorBatches(x, y, 16, augment=augment, seed=2, drop_last=True)
        ahead = TensorBatches(x, y, 16, augment=augment, seed=2, drop_last=True, prefetch=3)
        for loader in (sync, ahead):
            loader.set_epoch(4)
        a, b = list(sync), list(ahead)
        assert len(a) == len(b) == 12
        assert all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(a, b, strict=True)), augment


def test_prefetch_thread_errors_reach_the_loop_and_an_early_exit_stops_it():
    x, y = torch.zeros(64, 1, 8, 8, dtype=torch.uint8), torch.arange(64)
    broken = TensorBatches(x, y, 8, prefetch=2)
    broken.images = None  # the thread's gather fails
    with pytest.raises(TypeError):
        list(broken)
    loader = TensorBatches(x, y, 8, prefetch=2)
    it = iter(loader)
    next(it)
    it.close()  # the loop left early: the thread stops instead of filling its queue forever
    assert not any(t.name == "pst-dist-prefetch" and t.is_alive() for t in threading.enumerate())


def test_throughput_is_logged_per_epoch_and_summarised(tmp_path):
    cfg = load_config(None, [*SMALL, "--train.batch_size=32", "--data.synthetic_train=512",
                             f"--log.run_dir={tmp_path / 'run'}"])
    summary = train(cfg)
    tp = summary["throughput"]
    assert tp["img_per_s"] > 0 and tp["step_ms"] > 0 and 0 <= tp["data_wait"] < 1 and tp["peak_mem_gb"] > 0
    lines = [json.loads(s) for s in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    per_epoch = [rec for rec in lines if "perf/img_per_s" in rec and "epoch" in rec]
    assert len(per_epoch) == 2 and all(rec["perf/data_wait"] >= 0 for rec in per_epoch)
    meta = json.loads((tmp_path / "run" / "meta.json").read_text())
    resolved = meta["resolved"]
    assert resolved.pop("train.threads") == torch.get_num_threads()  # train.threads = 0: the process's count
    assert resolved == {"device": "cpu", "train.deterministic": True, "train.channels_last": False,
                        "train.compile": False, "data.stream": False}


class SyncDebugModes(StepWatch):
    """Hands batches over with CUDA's sync debug mode on ``error`` for plain steps, ``default`` for logging ones."""

    def __iter__(self):
        try:
            for batch in self.loader:
                torch.cuda.set_sync_debug_mode("error" if self.next_step % LOG_EVERY else "default")
                self.next_step += 1
                yield batch
        finally:
            torch.cuda.set_sync_debug_mode("default")


MIXED = ('--schedule.stages=[{name="plain",epochs=0.5},{name="mixup",epochs=0.5,loss={mix="mixup"}},'
         '{name="cutmix",loss={mix="cutmix"}}]')
"""Stages that mix their batches (loss.mix): the draws are made on the CPU, so they must not wait for the GPU."""


def cuda_check(tmp_path: Path) -> dict:
    """On a GPU: any synchronising call inside a plain step raises (CUDA's sync debug mode), plain and mixing
    stages alike."""
    cfg = load_config(None, [*SMALL, MIXED, "--train.device=cuda", "--train.bf16=true",
                             f"--log.run_dir={tmp_path / 'run'}"])
    data = build_data(cfg)
    loader = SyncDebugModes(build_loader(cfg, data, DistInfo(0, 1, 0), torch.device("cuda")))
    summary = train(cfg, data=data, loader=loader)
    return {"check": "cuda_sync_debug_mode_error_on_plain_steps", "ok": True, "steps": summary["steps"]}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA's sync debug mode needs a GPU")
def test_cuda_steps_do_not_synchronise(tmp_path):
    cuda_check(tmp_path)


def _reference_crop(x: torch.Tensor, mode: str, g: torch.Generator) -> torch.Tensor:
    """crop / crop_flip as the code before the batched augmentation (4ea3e82~1) wrote it: zero pad h // 8, one
    offset pair per image, then (crop_flip) one flip draw per image, in that order from ``g``; kept here so that the
    batched code is checked against it, not only against pinned digests."""
    n, c, h, w = x.shape
    pad = max(1, h // 8)
    xp = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    oy = torch.randint(0, 2 * pad + 1, (n,), generator=g)
    ox = torch.randint(0, 2 * pad + 1, (n,), generator=g)
    flip = torch.rand(n, generator=g) < 0.5 if mode == "crop_flip" else torch.zeros(n, dtype=torch.bool)
    out = torch.empty_like(x)
    for i in range(n):  # per image, by slicing
        img = xp[i, :, oy[i]: oy[i] + h, ox[i]: ox[i] + w]
        out[i] = img.flip(-1) if flip[i] else img
    return out


@pytest.mark.parametrize("mode", ["crop", "crop_flip"])
@pytest.mark.parametrize("shape,seed", [((32, 3, 16, 16), 3), ((17, 1, 28, 28), 5), ((8, 3, 32, 24), 7)])
def test_batched_crop_is_the_per_image_crop(mode, shape, seed):
    from pst_dist.data.loaders import augment_batch

    x = torch.randint(0, 256, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(seed + 100))
    got = augment_batch(x, mode, torch.Generator().manual_seed(seed))
    assert torch.equal(got, _reference_crop(x, mode, torch.Generator().manual_seed(seed)))


def _reference_ueraser(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """ueraser as written before the batched code (4ea3e82~1: crop + flip, then brightness / contrast, channel
    shuffle, posterise, erase), its draws in that code's order from ``g``, applied one image at a time by indexing."""
    n, c, h, w = x.shape
    base = _reference_crop(x, "crop_flip", g)
    bright = torch.empty(n, 1, 1, 1).uniform_(0.4, 1.6, generator=g)
    contrast = torch.empty(n, 1, 1, 1).uniform_(0.4, 1.6, generator=g)
    if c == 3:
        perm = torch.argsort(torch.rand(n, 3, generator=g), dim=1)
        shuffle = torch.rand(n, generator=g) < 0.5
    levels = 2 ** torch.randint(3, 7, (n, 1, 1, 1), generator=g).float()
    eh = (torch.rand(n, generator=g) * h / 2).long() + 1
    ew = (torch.rand(n, generator=g) * w / 2).long() + 1
    top = (torch.rand(n, generator=g) * (h - eh + 1)).long()
    left = (torch.rand(n, generator=g) * (w - ew + 1)).long()
    erase = torch.rand(n, generator=g) < 0.5
    fill = torch.randint(0, 256, (n, c, h, w), generator=g)
    out = torch.empty_like(x)
    for i in range(n):
        f, b, k, q = base[i].float(), bright[i, 0, 0, 0], contrast[i, 0, 0, 0], levels[i, 0, 0, 0]
        m = f.mean()
        f = ((f * b - m * b) * k + m * b).clamp(0, 255)
        if c == 3 and shuffle[i]:
            f = f[perm[i]]
        f = (f / 256 * q).floor() * (255 / (q - 1))
        if erase[i]:
            t, lf = int(top[i]), int(left[i])
            f[:, t: t + int(eh[i]), lf: lf + int(ew[i])] = fill[i, :, t: t + int(eh[i]), lf: lf + int(ew[i])].float()
        out[i] = f.round().clamp(0, 255).to(torch.uint8)
    return out


@pytest.mark.parametrize("shape,seed", [((32, 3, 16, 16), 3), ((17, 1, 28, 28), 5), ((8, 3, 32, 24), 7)])
def test_batched_ueraser_is_the_per_image_ueraser(shape, seed):
    from pst_dist.data.loaders import augment_batch

    x = torch.randint(0, 256, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(seed + 100))
    got = augment_batch(x, "ueraser", torch.Generator().manual_seed(seed))
    assert torch.equal(got, _reference_ueraser(x, torch.Generator().manual_seed(seed)))


@pytest.mark.parametrize("mode,digest", [("crop", "577cc41521e712c1"), ("crop_flip", "32015149ed24e1e1"),
                                         ("ueraser", "85eb583b94cfead1")])
def test_batched_augmentation_keeps_the_per_sample_code_s_output(mode, digest):
    """Pinned: these are the outputs of the per-sample code the batched one replaced (checked against it, and against
    per-image references above), so runs and cached bench cells from before keep their augmentation. (rrc_flip
    changed: vectorised draws, roi_align.)"""
    import hashlib

    from pst_dist.data.loaders import augment_batch

    x = torch.randint(0, 256, (32, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(11))
    out = augment_batch(x, mode, torch.Generator().manual_seed(3))
    assert hashlib.sha256(out.numpy().tobytes()).hexdigest()[:16] == digest


def test_a_run_recorded_before_deterministic_auto_resumes(tmp_path):
    """Runs recorded ``train.deterministic = true`` (the old default) resume under the new default ``auto`` on the
    CPU, where it means the same; an explicit change of meaning is still refused."""
    from pst_dist.rundir import RunDirError

    base = [*SMALL, "--train.batch_size=64", "--data.synthetic_train=256", f"--log.run_dir={tmp_path / 'run'}"]
    train(load_config(None, [*base, "--train.epochs=1", "--train.deterministic=true", "--train.checkpoint_every=1"]))
    assert train(load_config(None, [*base, "--train.epochs=2"]), resume=True)["status"] == "finished"
    with pytest.raises(RunDirError, match="train.deterministic"):
        train(load_config(None, [*base, "--train.epochs=3", "--train.deterministic=false"]), resume=True)


def test_on_device_set_gives_the_same_batches():
    x = torch.randint(0, 256, (96, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    y = torch.arange(96)
    host = TensorBatches(x, y, 16, augment="ueraser", seed=5, drop_last=True, prefetch=2)
    resident = TensorBatches(x, y, 16, augment="ueraser", seed=5, drop_last=True, on_device=True)
    for loader in (host, resident):
        loader.set_epoch(1)
    assert all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(host, resident, strict=True))


FREEZE_STAGES = ('--schedule.stages=[{name="warm",epochs=1},{name="frozen",epochs=1,freeze=[0,1],'
                 'reinit_head=true},{name="release",group_mults={"0"=0.1,"1"=0.1}}]')


def test_compiled_run_keeps_frozen_groups_still_and_recompiles_per_stage_only(tmp_path, monkeypatch):
    """train.compile under a PST schedule: graph capture with the frozen-prefix hooks (aot_eager: the same capture
    and guards as inductor, without building kernels), frozen groups bit-identical through their frozen epoch, a
    bounded number of graphs, and the same run as eager up to float rounding."""
    import pst_dist.train as T

    monkeypatch.setattr(T, "COMPILE_OPTIONS", {"backend": "aot_eager"})
    snaps: dict[int, dict] = {}

    def on_epoch(epoch, logs, gm, engine):
        snaps[epoch] = {n: p.detach().clone() for n, p in gm.model.named_parameters()}
        snaps[epoch].update({f"buffer:{n}": b.detach().clone() for n, b in gm.model.named_buffers()})
        snaps[epoch]["_groups"] = [g.param_names for g in gm.groups]

    base = [*SMALL, "--train.batch_size=64", "--data.synthetic_train=512", "--train.epochs=3", FREEZE_STAGES]
    compiled = T.train(load_config(None, [*base, "--train.compile=true", f"--log.run_dir={tmp_path / 'c'}"]),
                       on_epoch=on_epoch)
    eager = train(load_config(None, [*base, f"--log.run_dir={tmp_path / 'eager'}"]))  # after: it counts its own
    frozen = [n for g in snaps[1]["_groups"][:2] for n in g]
    assert frozen and all(torch.equal(snaps[1][n], snaps[2][n]) for n in frozen), "frozen groups moved"
    modules = {n.rsplit(".", 1)[0] for n in frozen}  # their BatchNorm running statistics stay fixed too
    stats = [k for k in snaps[1] if k.startswith("buffer:") and k[len("buffer:"):].rsplit(".", 1)[0] in modules
             and "running" in k]
    assert stats and all(torch.equal(snaps[1][k], snaps[2][k]) for k in stats), "frozen BatchNorm statistics moved"
    assert any(not torch.equal(snaps[2][n], snaps[3][n]) for n in frozen), "released groups must move again"
    assert eager["throughput"]["compiles"] == 0  # the run's own graphs, not the process's (a bench's earlier cells)
    graphs = compiled["throughput"]["compiles"]
    assert 1 <= graphs <= 4 * 3 + 8, graphs  # one per stage's prefix / BatchNorm modes, detectors and eval
    # the same run: its weights to float rounding (aot_eager gave them to the bit here), its curve to an image or two
    assert compiled["model_checksum"] == pytest.approx(eager["model_checksum"], rel=1e-5)
    assert compiled["test_curve"] == pytest.approx(eager["test_curve"], abs=0.02)


def test_fast_vit_recipe_trains_an_image_folder(tmp_path, monkeypatch):
    """launch/configs/vit_base_imagenet_mini_fast.toml end to end on a tiny ImageFolder (a ViT-Tiny at 32 px instead
    of ViT-B at 192 px; compile through aot_eager): every fast-path setting of the recipe in one run."""
    import numpy as np
    from PIL import Image

    import pst_dist.train as T

    monkeypatch.setattr(T, "COMPILE_OPTIONS", {"backend": "aot_eager"})
    rng = np.random.default_rng(0)
    for split, n in (("train", 24), ("val", 6)):
        for c in ("n01", "n02"):
            (tmp_path / "folder" / split / c).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(
                    tmp_path / "folder" / split / c / f"{i}.JPEG")
    recipe = Path(__file__).parent.parent / "launch" / "configs" / "vit_base_imagenet_mini_fast.toml"
    cfg = load_config(recipe, [f"--data.root={tmp_path / 'folder'}", "--data.img_size=32", "--data.val_size=8",
                               "--data.probe_size=8", "--model.name=vit_tiny_patch16_224", "--model.patch_size=8",
                               "--train.epochs=2", "--train.batch_size=8", "--train.warmup_steps=2",
                               "--train.eval_every=1", "--log.progress=false", "--log.tensorboard=false",
                               f"--log.run_dir={tmp_path / 'run'}"])
    assert cfg.train.compile and cfg.data.augment == "rrc_flip" and cfg.train.bf16
    summary = T.train(cfg)
    assert summary["status"] == "finished" and summary["steps"] == 2 * (40 // 8)
    assert summary["throughput"]["compiles"] > 0
    meta = json.loads((tmp_path / "run" / "meta.json").read_text())
    assert meta["resolved"]["train.compile"] is True


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        print(json.dumps(cuda_check(Path(d))))
    sys.exit(0)
