"""pst-dist eval and export on real runs. eval reproduces a run's own final test (and val) accuracy from its checkpoint,
for a plain torch run and a 2-rank DeepSpeed ZeRO-3 run (partitions gathered by DeepSpeed's zero_to_fp32), and scores
other data through --data.* overrides as the run's model does; export loads into fresh timm models (plain timm for a
model without a hook, pst_dist.models.load_exported for the small-stem ResNet) that predict what the run's model
predicts."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file
from torchvision.transforms.functional import gaussian_blur

from pst_dist import evaluate
from pst_dist.cli import main
from pst_dist.config import ConfigError, load_config
from pst_dist.data.pipeline import Normalize, build_data
from pst_dist.export import load_scored
from pst_dist.models import build_model, load_exported
from pst_dist.train import predict, train

from .conftest import MARKER_TEXT, deepspeed_env, place_marker, quadrant_images

HERE = Path(__file__).parent


def quadrant_folder(root: Path, seed: int, n_train: int = 192, n_test: int = 64) -> Path:
    """An imagefolder (train/<class>/, test/<class>/ PNGs, 16 x 16) of 4 classes, each a bright quadrant: a tiny
    model learns it in two epochs (without flips, which move the quadrant), so accuracies are far from chance and a
    wrong model shows."""
    for split, n, s in (("train", n_train, seed), ("test", n_test, seed + 1)):
        x, y = quadrant_images(n, 3, s, 30, 170)
        for i, (img, label) in enumerate(zip(x, y, strict=True)):
            d = root / split / f"c{int(label)}"
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img.permute(1, 2, 0).numpy()).save(d / f"{i:04d}.png")
    return root


def folder_args(root: Path) -> list[str]:
    return [f"--data.root={root}", "--data.source=imagefolder", "--data.img_size=16", "--data.val_size=32",
            "--data.probe_size=32", "--model.width=0.125", "--train.batch_size=32", "--train.epochs=2",
            "--train.optimizer=adamw", "--train.lr=0.01", "--data.augment=none", "--log.progress=false",
            "--log.tensorboard=false"]


def run_in_process(run_dir: Path, args: list[str]) -> dict:
    """Train; returns the summary and the trained model's weights at the end (read from memory, not a checkpoint)."""
    cfg = load_config(None, [*args, f"--log.run_dir={run_dir}"])
    end = {}

    def on_epoch(epoch, logs, gm, engine):
        end["state"] = {k: v.detach().clone() for k, v in gm.model.state_dict().items()}

    summary = train(cfg, on_epoch=on_epoch)
    return {"summary": summary, "state": end["state"], "cfg": cfg}


def logits(model: torch.nn.Module, cfg_args: list[str]) -> torch.Tensor:
    """The model's logits on the test split ``cfg_args`` describe, normalised as the training run normalises."""
    data = build_data(load_config(None, cfg_args))
    norm = Normalize(data.mean, data.std, torch.device("cpu"))
    with torch.no_grad():
        return model.eval()(norm(data.splits.test.images.float() / 255))


def run_model(run: dict, hooked_args: list[str]) -> torch.nn.Module:
    """A fresh model with the run's in-memory final weights."""
    cfg = load_config(None, hooked_args)
    model = build_model(cfg.model, 4, 3, 16)
    model.load_state_dict(run["state"])
    return model


def eval_cli(capsys, *args) -> dict:
    assert main(["eval", *map(str, args)]) == 0
    return json.loads(capsys.readouterr().out)


def snapshot(d: Path) -> dict:
    return {str(p.relative_to(d)): p.stat().st_mtime_ns for p in d.rglob("*")}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("eval")
    data, other = quadrant_folder(tmp / "data", 0), quadrant_folder(tmp / "other", 10)
    args = folder_args(data)
    return {"data": data, "other": other, "args": args,
            "small_stem": {**run_in_process(tmp / "small_stem", args), "dir": tmp / "small_stem"},
            "timm_stem": {**run_in_process(tmp / "timm_stem", [*args, "--model.small_stem=false", "--train.epochs=1"]),
                          "dir": tmp / "timm_stem"}}


def test_eval_reproduces_the_runs_accuracy_and_writes_nothing_into_it(runs, capsys, tmp_path):
    run = runs["small_stem"]
    s, before = run["summary"], snapshot(run["dir"])
    assert s["final_test_acc"] > 0.6, "the tiny run should learn the quadrant classes (else the check is weak)"
    r = eval_cli(capsys, "--run", run["dir"])
    assert r["accuracy"] == s["final_test_acc"] and r["epoch"] == 2 and r["images"] == 64
    assert eval_cli(capsys, "--run", run["dir"], "--split", "val")["accuracy"] == s["final_val_acc"]
    out = tmp_path / "eval.json"
    assert eval_cli(capsys, "--run", run["dir"], "--checkpoint", run["dir"] / "checkpoint.pt", "--out", out) == r
    assert json.loads(out.read_text()) == r
    assert snapshot(run["dir"]) == before, "eval changed the run directory"
    capsys.readouterr()
    assert main(["eval", "--run", str(run["dir"]), "--out", str(out)]) == 2  # exists: --overwrite needed
    assert f"--out {out}" in (err := capsys.readouterr().err) and "pass --overwrite" in err, err
    assert main(["eval", "--run", str(run["dir"]), "--out", str(out), "--overwrite"]) == 0
    marker = place_marker(tmp_path)
    capsys.readouterr()
    assert main(["eval", "--run", str(run["dir"]), "--out", str(marker), "--overwrite"]) == 2
    assert "is not an earlier `pst-dist eval` output" in (err := capsys.readouterr().err), err
    assert marker.read_text() == MARKER_TEXT, "eval replaced a file it did not write"


def test_eval_of_a_run_whose_meta_predates_inputs(runs, capsys, tmp_path):
    """Runs written before meta.json recorded the model's inputs: they are read off the run's own data."""
    old = tmp_path / "old"
    shutil.copytree(runs["small_stem"]["dir"], old)
    meta = json.loads((old / "meta.json").read_text())
    del meta["inputs"]
    (old / "meta.json").write_text(json.dumps(meta))
    assert eval_cli(capsys, "--run", old)["accuracy"] == runs["small_stem"]["summary"]["final_test_acc"]


def test_eval_on_other_data_scores_as_the_runs_model(runs, capsys):
    run, other = runs["small_stem"], runs["other"]
    r = eval_cli(capsys, "--run", run["dir"], f"--data.root={other}")
    assert r["images"] == 64 and r["data.root"] == str(other)
    assert r["overrides"] == [f"--data.root={other}"]  # what made it other data, as given (the record says how)
    assert "overrides" not in eval_cli(capsys, "--run", run["dir"])
    # the other folder's test images through the run's in-memory model, normalised with the run's statistics
    data = build_data(load_config(None, runs["args"]))
    test = build_data(load_config(None, folder_args(other))).splits.test
    assert not torch.equal(test.images, data.splits.test.images)
    with torch.no_grad():
        x = Normalize(data.mean, data.std, torch.device("cpu"))(test.images.float() / 255)
        want = int((run_model(run, runs["args"]).eval()(x).argmax(1) == test.labels).sum()) / len(test.labels)
    assert r["accuracy"] == want


def test_eval_refusals_name_the_problem(runs, capsys, tmp_path, monkeypatch):
    run = runs["small_stem"]
    assert main(["eval", "--run", str(run["dir"]), "--model.width=1.0"]) == 2
    assert "model.width" in capsys.readouterr().err
    five = quadrant_folder(tmp_path / "five", 3, n_train=80, n_test=40)
    for split in ("train", "test"):  # a fifth class
        shutil.copytree(five / split / "c0", five / split / "c4")
    assert main(["eval", "--run", str(run["dir"]), f"--data.root={five}"]) == 2
    assert "4 classes" in capsys.readouterr().err
    assert main(["eval", "--run", str(tmp_path)]) == 2
    assert "no config.toml" in capsys.readouterr().err
    few = quadrant_folder(tmp_path / "few", 5, n_train=24, n_test=16)  # the run's validation carve (32) cannot fit
    assert main(["eval", "--run", str(run["dir"]), f"--data.root={few}"]) == 2
    assert ("data.val_size=32 leaves no training images (train has 24): data.val_size is the run's recorded value; "
            "for this data give --data.val_size=N") in capsys.readouterr().err
    assert main(["eval", "--run", str(run["dir"]), f"--data.root={few}", "--data.val_size=8"]) == 0
    assert json.loads(capsys.readouterr().out)["images"] == 16
    other = runs["timm_stem"]["dir"] / "checkpoint.pt"  # another run's weights under this run's data and views
    for cmd in (["eval"], ["export", "--out", str(tmp_path / "mixed")]):
        assert main([*cmd, "--run", str(run["dir"]), "--checkpoint", str(other)]) == 2
        assert f"--checkpoint {other}: not in the run {run['dir']}" in capsys.readouterr().err
    assert not (tmp_path / "mixed").exists()
    kept = tmp_path / "kept"  # the run's checkpoint moved to other storage, linked from the run: its own
    shutil.copytree(run["dir"], kept)
    (tmp_path / "scratch").mkdir()
    (kept / "checkpoint.pt").rename(tmp_path / "scratch" / "c.pt")
    (kept / "checkpoint.pt").symlink_to(tmp_path / "scratch" / "c.pt")
    assert main(["eval", "--run", str(kept), "--checkpoint", str(kept / "checkpoint.pt")]) == 0
    capsys.readouterr()
    assert main(["eval", "--run", str(run["dir"]), "--out", str(tmp_path / "nodir" / "e.json")]) == 2
    assert "nodir is not a directory" in capsys.readouterr().err
    late = tmp_path / "late.json"  # absent when eval checked it, a user's file by the time it writes
    real = evaluate.evaluate_run

    def user_writes_meanwhile(*a, **kw):
        late.write_text("my notes\n")
        return real(*a, **kw)

    monkeypatch.setattr(evaluate, "evaluate_run", user_writes_meanwhile)
    for overwrite, says in (([], "appeared while evaluating"), (["--overwrite"], "is not an earlier")):
        late.unlink(missing_ok=True)
        assert main(["eval", "--run", str(run["dir"]), "--out", str(late), *overwrite]) == 2
        assert f"--out {late}: " in (err := capsys.readouterr().err) and says in err and \
            late.read_text() == "my notes\n", err
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    odd = tmp_path / "odd"  # a run whose meta.json lost a key, or whose ds_checkpoint/latest points out of it
    shutil.copytree(run["dir"], odd)
    meta = json.loads((odd / "meta.json").read_text())
    del meta["inputs"]["shape"]
    (odd / "meta.json").write_text(json.dumps(meta))
    for cmd in (["eval"], ["export", "--out", str(tmp_path / "odd_export")]):
        assert main([*cmd, "--run", str(odd)]) == 2
        assert f"{odd / 'meta.json'}: its inputs" in capsys.readouterr().err
    shutil.copy(run["dir"] / "meta.json", odd / "meta.json")
    (odd / "checkpoint.pt").unlink()
    (odd / "ds_checkpoint").mkdir()
    for latest, says in ((b"../../" + str(run["dir"] / "checkpoint.pt").encode(), "not a checkpoint tag"),
                         (b"\xff\xfe", "cannot be read")):
        (odd / "ds_checkpoint" / "latest").write_bytes(latest)
        assert main(["eval", "--run", str(odd)]) == 2
        assert f"{odd / 'ds_checkpoint' / 'latest'}: " in (err := capsys.readouterr().err) and says in err, err
    assert not (tmp_path / "odd_export").exists()


def test_export_small_stem_loads_through_pst_dist_with_the_runs_predictions(runs, tmp_path, capsys):
    run = runs["small_stem"]
    out = tmp_path / "export"
    assert main(["export", "--run", str(run["dir"]), "--out", str(out)]) == 0
    assert "load_exported" in capsys.readouterr().out
    spec = json.loads((out / "config.json").read_text())
    assert spec["pst_dist"]["plain_timm"] is False and spec["pretrained_cfg"]["input_size"] == [3, 16, 16]
    want = logits(run_model(run, runs["args"]), runs["args"])
    assert torch.equal(logits(load_exported(out), runs["args"]), want)
    with torch.no_grad():  # no test-time views: [0, 1] images in, the run's normalisation, the logits out
        assert torch.equal(load_scored(out)(build_data(load_config(None, runs["args"])).splits.test.images / 255), want)
    model = build_model(load_config(None, runs["args"]).model, 4, 3, 16)  # plain load_state_dict
    model.load_state_dict(load_file(out / "model.safetensors"))
    assert torch.equal(logits(model, runs["args"]), want)
    with pytest.raises(RuntimeError, match="conv1"):  # timm alone cannot build the 3x3 stem (as the docs say)
        timm.create_model(f"local-dir:{out}", pretrained=True)
    capsys.readouterr()
    assert main(["export", "--run", str(run["dir"]), "--out", str(out)]) == 2  # an earlier export: --overwrite
    assert "holds an earlier `pst-dist export` output; pass --overwrite" in (err := capsys.readouterr().err), err
    assert main(["export", "--run", str(run["dir"]), "--out", str(out), "--overwrite"]) == 0
    marker = place_marker(tmp_path / "theirs")
    capsys.readouterr()
    assert main(["export", "--run", str(run["dir"]), "--out", str(marker.parent)]) == 2
    assert "not empty and not an earlier `pst-dist export` output" in (err := capsys.readouterr().err), err
    assert main(["export", "--run", str(run["dir"]), "--out", str(tmp_path / "m.safetensors")]) == 2
    assert "m.safetensors: name a folder" in (err := capsys.readouterr().err), err
    assert marker.read_text() == MARKER_TEXT and not (tmp_path / "m.safetensors").exists()
    for i, theirs in enumerate(("null", '"pst_dist"')):  # a user's config.json, not an export's
        (tmp_path / f"user{i}").mkdir()
        (tmp_path / f"user{i}" / "config.json").write_text(theirs)
        assert main(["export", "--run", str(run["dir"]), "--out", str(tmp_path / f"user{i}"), "--overwrite"]) == 2
        assert "not an earlier `pst-dist export` output" in capsys.readouterr().err
        assert (tmp_path / f"user{i}" / "config.json").read_text() == theirs


def test_export_without_hook_loads_into_plain_timm(runs, tmp_path):
    run = runs["timm_stem"]
    args = [*runs["args"], "--model.small_stem=false"]
    out = tmp_path / "export"
    assert main(["export", "--run", str(run["dir"]), "--out", str(out)]) == 0
    spec = json.loads((out / "config.json").read_text())
    assert spec["pst_dist"]["plain_timm"] is True
    want = logits(run_model(run, args), args)
    assert torch.equal(logits(timm.create_model(f"local-dir:{out}", pretrained=True), args), want)
    overlay = timm.create_model(spec["architecture"], pretrained=True, **spec["model_args"],
                                pretrained_cfg_overlay=dict(file=str(out / "model.safetensors"),
                                                            **spec["pretrained_cfg"]))
    assert torch.equal(logits(overlay, args), want)
    assert torch.equal(logits(load_exported(out), args), want)


@pytest.mark.multiproc
def test_eval_and_export_of_a_zero3_run_gather_every_partition(tmp_path, capsys):
    """A 2-rank DeepSpeed ZeRO-3 run (each rank holds half of every parameter): eval gathers the partitions with
    DeepSpeed's zero_to_fp32 and reproduces the run's final test accuracy; the exported weights sum to the run's
    own checksum of its gathered parameters."""
    data = quadrant_folder(tmp_path / "data", 0)
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "pst_dist.cli",
           "train", *folder_args(data), "--train.batch_size=16",  # 2 ranks x 16: the steps of the 1-process runs
           "--deepspeed.enabled=true", "--deepspeed.zero_stage=3", f"--log.run_dir={run}"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=deepspeed_env(), start_new_session=True)
    assert p.returncode == 0, p.stderr[-3000:]
    s = json.loads((run / "summary.json").read_text())
    assert s["world_size"] == 2 and s["final_test_acc"] > 0.6
    r = eval_cli(capsys, "--run", run)
    assert r["accuracy"] == s["final_test_acc"] and r["checkpoint"].endswith(f"ds_checkpoint/step{s['steps']}")
    assert main(["export", "--run", str(run), "--out", str(tmp_path / "export")]) == 0
    model = load_exported(tmp_path / "export")
    checksum = float(sum(p.detach().double().abs().sum() for p in model.parameters()))
    assert checksum == s["model_checksum"], "the gathered weights are not the run's"


def test_a_bf16_deepspeed_run_s_export_scores_what_eval_scores(tmp_path, capsys):
    """A real 16-bit run (DeepSpeed bf16, one process): pst-dist eval reproduces its final test accuracy, its export
    records bfloat16, and load_scored on the export scores the test split to eval's accuracy."""
    data = quadrant_folder(tmp_path / "data", 0)
    run = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    p = subprocess.run([sys.executable, "-m", "pst_dist.cli", "train", *folder_args(data), "--deepspeed.enabled=true",
                        "--deepspeed.bf16=true", f"--log.run_dir={run}"], capture_output=True, text=True,
                       timeout=300, env={**env, "OMP_NUM_THREADS": "1"}, start_new_session=True)
    assert p.returncode == 0, p.stderr[-3000:]
    s = json.loads((run / "summary.json").read_text())
    assert s["final_test_acc"] > 0.6, "the run should learn the quadrants (else the comparison is weak)"
    r = eval_cli(capsys, "--run", run)
    assert r["accuracy"] == s["final_test_acc"]
    assert main(["export", "--run", str(run), "--out", str(tmp_path / "export")]) == 0
    assert json.loads((tmp_path / "export" / "config.json").read_text())["pst_dist"]["dtype"] == "bfloat16"
    scored = load_scored(tmp_path / "export")
    assert next(scored.model.parameters()).dtype == torch.bfloat16
    test = build_data(load_config(None, folder_args(data))).splits.test
    with torch.no_grad():
        got = scored(test.images.float() / 255).argmax(1)
    assert int((got == test.labels).sum()) / len(test.labels) == r["accuracy"]


def test_test_time_views_score_the_mean_softmax_and_leave_training_as_it_was(runs, capsys, tmp_path):
    """schedule.eval_views: training is unchanged (same weights), its logged accuracies are the mean softmax over the
    raw image and the views, and `pst-dist eval` reproduces them (and scores other views when told)."""
    views = ["blur:2", "downup:3"]
    r = run_in_process(tmp_path / "views", [*runs["args"], f"--schedule.eval_views={json.dumps(views)}"])
    capsys.readouterr()  # the training's epoch lines
    plain = runs["small_stem"]
    assert all(torch.equal(r["state"][k], v) for k, v in plain["state"].items()), "eval views changed training"
    data = build_data(load_config(None, runs["args"]))
    norm = Normalize(data.mean, data.std, torch.device("cpu"))
    x, y = data.splits.test.images.float() / 255, data.splits.test.labels
    model = run_model(r, runs["args"]).eval()
    blurred = gaussian_blur(x, [13, 13], [2.0, 2.0])
    pooled = F.interpolate(F.avg_pool2d(x, 4, ceil_mode=True), size=(16, 16), mode="bilinear", align_corners=False)
    with torch.no_grad():
        probs = sum(model(norm(v)).softmax(1) for v in (x, blurred, pooled))
    want = int((probs.argmax(1) == y).sum()) / len(y)
    assert r["summary"]["final_test_acc"] == want
    assert want != plain["summary"]["final_test_acc"], "these views should change some predictions (else weak)"
    assert eval_cli(capsys, "--run", tmp_path / "views")["accuracy"] == want
    assert eval_cli(capsys, "--run", tmp_path / "views", "--schedule.eval_views=[]")["accuracy"] == \
        plain["summary"]["final_test_acc"]
    got = eval_cli(capsys, "--run", plain["dir"], f"--schedule.eval_views={json.dumps(views)}")
    assert got["accuracy"] == want and got["eval_views"] == views
    out = tmp_path / "export"
    assert main(["export", "--run", str(tmp_path / "views"), "--out", str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["pst_dist"]["eval_views"] == views
    scored = load_scored(out)  # the export scores as the run did: mean softmax over the image and its views
    with torch.no_grad():
        got = scored(x)
    assert scored.views == views and torch.equal(got, probs / 3)
    assert int((got.argmax(1) == y).sum()) / len(y) == want


def test_a_scored_export_evaluates_in_its_runs_dtype_and_refuses_what_it_cannot_score(runs, tmp_path):
    """A 16-bit DeepSpeed run evaluated in bf16 / fp16 (its export records the dtype): load_scored casts the model,
    normalises in float32 and casts the input, as pst-dist eval does; a cast of the wrapper keeps the statistics;
    integer images and a config.json it cannot score from are refused, naming the problem."""
    out = tmp_path / "export"
    assert main(["export", "--run", str(runs["small_stem"]["dir"]), "--out", str(out)]) == 0
    spec = json.loads((out / "config.json").read_text())
    assert spec["pst_dist"]["dtype"] == "float32"
    data = build_data(load_config(None, runs["args"]))
    x = data.splits.test.images.float() / 255
    spec["pst_dist"].update(dtype="bfloat16", eval_views=["blur:1"])
    (out / "config.json").write_text(json.dumps(spec))
    scored = load_scored(out)
    assert next(scored.model.parameters()).dtype == torch.bfloat16
    norm = Normalize(data.mean, data.std, torch.device("cpu"), torch.bfloat16)  # pst-dist eval's, for a bf16 run
    with torch.no_grad():
        want = predict(load_exported(out).to(torch.bfloat16), x, norm, ["blur:1"])
        assert torch.equal(scored(x), want) and torch.equal(scored.to(torch.bfloat16)(x), want)
    with pytest.raises(TypeError, match="uint8"):
        scored(data.splits.test.images)
    for key, value, named in [("eval_views", ["randblur:1"], "random"), ("eval_views", "blur:1", "a list of views"),
                              ("dtype", "int8", "pst_dist.dtype='int8'")]:
        bad = json.loads(json.dumps(spec))
        bad["pst_dist"][key] = value
        (out / "config.json").write_text(json.dumps(bad))
        with pytest.raises(ConfigError, match=named):
            load_scored(out)
    del spec["pretrained_cfg"]["std"]
    (out / "config.json").write_text(json.dumps(spec))
    with pytest.raises(ConfigError, match="no mean / std"):
        load_scored(out)
