"""Model-based attacks (EM sample- and class-wise, REM, TAP) and the import of folders of poisoned images."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pst_dist.config import ConfigError, PoisonConfig, load_config
from pst_dist.poison import PoisonFileError, import_poison, poison_train
from pst_dist.poison.model_based import LAST_RUN

ROOT = Path(__file__).resolve().parent.parent


def tiny(kind: str, chans: int, seed: int = 0, **poison) -> tuple:
    """40 images of 4 classes whose class shows as a bright quadrant, a 1/8-width ResNet-10 surrogate."""
    g = torch.Generator().manual_seed(123)
    y = torch.arange(40) % 4
    x = torch.randint(40, 160, (40, chans, 16, 16), generator=g, dtype=torch.uint8)
    for c in range(4):
        r, q = divmod(c, 2)
        x[y == c, :, 8 * r: 8 * r + 8, 8 * q: 8 * q + 8] += 60
    over = [f"--poison.kind={kind}", f"--poison.seed={seed}", "--model.name=resnet10t", "--model.width=0.125",
            "--model.stem_pool=true", "--train.device=cpu", "--poison.batch_size=16", "--poison.steps=3",
            "--poison.train_steps=3", "--poison.max_rounds=2", "--poison.model_epochs=1"]
    over += [f"--poison.{k}={v}" for k, v in poison.items()]
    return x, y, load_config(None, over)


def gen(x, y, cfg):
    return poison_train(x, y, torch.arange(len(y)), len(y), cfg.poison, 4, full=cfg)


@pytest.mark.parametrize("kind,extra", [("em", {}), ("em", {"granularity": '"class"'}), ("rem", {}), ("tap", {})],
                         ids=["em-sample", "em-class", "rem", "tap"])
@pytest.mark.parametrize("chans", [1, 3])
def test_model_based_budget_and_determinism(kind, extra, chans):
    torch.set_num_threads(1)
    x, y, cfg = tiny(kind, chans, **extra)
    p1 = gen(x, y, cfg)
    info = dict(LAST_RUN)
    assert info["attack"] == kind and info["seconds"] >= 0
    p2 = gen(x, y, cfg)
    assert p1.dtype == torch.uint8 and p1.shape == x.shape
    assert torch.equal(p1, p2), "same seed must give the same poison"
    d = p1.to(torch.int16) - x.to(torch.int16)
    assert 0 < int(d.abs().max()) <= 8, "L-inf budget 8/255, and the poison is not empty"
    assert not torch.equal(p1, gen(*tiny(kind, chans, seed=1, **extra))), "another seed, another poison"
    if extra.get("granularity") == '"class"':  # no clipping in 40..220: the offset is the class's own noise
        for c in range(4):
            assert torch.equal(d[y == c], d[y == c][:1].expand_as(d[y == c]))
    elif kind != "tap":
        assert not torch.equal(d[y == 0][0], d[y == 0][1]), "sample-wise noise differs within a class"


def test_em_stops_at_the_target_train_error():
    torch.set_num_threads(1)
    x, y, cfg = tiny("em", 1, stop_error=0.5, max_rounds=20, steps=5, train_steps=10)
    gen(x, y, cfg)
    assert LAST_RUN["stop_error_reached"] and LAST_RUN["train_error"] <= 0.5
    assert LAST_RUN["rounds"] < 20
    x, y, cfg = tiny("em", 1, stop_error=0.0, max_rounds=1)  # unreachable: stops at max_rounds and says so
    gen(x, y, cfg)
    assert LAST_RUN["rounds"] == 1 and not LAST_RUN["stop_error_reached"]


def test_tap_perturbs_towards_the_next_class():
    torch.set_num_threads(1)
    x, y, cfg = tiny("tap", 3, steps=10, model_epochs=6)
    gen(x, y, cfg)
    assert LAST_RUN["target_success"] > 0.25, LAST_RUN  # chance is 0.25 at most for a wrong class


@pytest.mark.parametrize("bad,msg", [(dict(granularity="pixel"), "granularity"), (dict(steps=0), "steps"),
                                     (dict(stop_error=1.0), "stop_error"), (dict(adv_eps=0.0), "adv_eps")])
def test_model_based_config_errors(bad, msg):
    with pytest.raises(ConfigError, match=msg):
        PoisonConfig(kind="em", **bad)


@pytest.mark.multiproc
def test_em_data_parallel_on_two_processes_gives_every_rank_the_same_poison(tmp_path):
    """Two gloo ranks share the surrogate's gradients and the images' noise: both end with one poison."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                    str(ROOT / "tests" / "attack_worker.py"), str(tmp_path)], check=True, env=env, timeout=300,
                   capture_output=True)
    p0, p1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert torch.equal(p0["poisoned"], p1["poisoned"])
    d = p0["poisoned"].to(torch.int16) - p0["clean"].to(torch.int16)
    assert 0 < int(d.abs().max()) <= 8
    assert p0["info"] == p1["info"] and p0["info"]["rounds"] >= 1


# ------------------------------------------------------------------ folders of poisoned images

def write_folder(root: Path, images: torch.Tensor, labels: torch.Tensor | None, suffix: str = ".png") -> None:
    for i, im in enumerate(images):
        d = root / str(int(labels[i])) if labels is not None else root
        d.mkdir(parents=True, exist_ok=True)
        arr = im.permute(1, 2, 0).numpy()
        Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr).save(d / f"{i:05d}{suffix}")


@pytest.mark.parametrize("chans", [1, 3])
@pytest.mark.parametrize("class_folders", [False, True])
def test_folder_import_round_trip(tmp_path, chans, class_folders):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(20, 230, (12, chans, 8, 8), generator=g, dtype=torch.uint8)
    y = torch.arange(12) % 3
    poisoned = (x.to(torch.int16) + torch.randint(-8, 9, x.shape, generator=g)).clamp(0, 255).to(torch.uint8)
    write_folder(tmp_path / "p", poisoned, y if class_folders else None)
    idx = torch.tensor([3, 0, 7])  # a subset of the training split, in the loader's order
    cfg = PoisonConfig(kind="file", path=str(tmp_path / "p"))
    assert torch.equal(import_poison(x[idx], idx, 12, cfg, y[idx]), poisoned[idx])


def folder_case(tmp_path, case):
    x = torch.full((6, 1, 8, 8), 100, dtype=torch.uint8)
    y = torch.arange(6) % 2
    p = x.clone()
    p[:, :, 0, 0] += 4
    root = tmp_path / "p"
    if case == "missing":
        write_folder(root, p[:5], None)
    elif case == "size":
        write_folder(root, p, None)
        Image.fromarray(np.full((9, 8), 100, np.uint8)).save(root / "00002.png")
    elif case == "channels":
        write_folder(root, p, None)
        rgb = np.full((8, 8, 3), 100, np.uint8)
        rgb[0, 0] = (90, 100, 110)
        Image.fromarray(rgb).save(root / "00002.png")
    elif case == "label":
        write_folder(root, p, (y + 1) % 2)
    elif case == "name":
        write_folder(root, p, None)
        (root / "00002.png").rename(root / "img_2.png")
    elif case == "budget":
        p[1, 0, 3, 3] = 140
        write_folder(root, p, None)
    elif case == "range":
        write_folder(root, p, None)
        (root / "00005.png").rename(root / "00006.png")
    return x, y, PoisonConfig(kind="file", path=str(root))


@pytest.mark.parametrize("case,msg", [
    ("missing", r"expected 6 images .* found 5; missing rows e.g. \[5\]"),
    ("size", "image size 8x9: expected 8x8"),
    ("channels", "3 channel.*expected 1"),
    ("label", "in class folder 1, but training row 0 has label 0"),
    ("name", "file name 'img_2': expected the image's row"),
    ("budget", "L-inf 40/255 exceeds poison.eps = 8/255"),
    ("range", "row 6 out of range: the training split has 6 images"),
])
def test_folder_import_errors_name_expected_and_found(tmp_path, case, msg):
    x, y, cfg = folder_case(tmp_path, case)
    with pytest.raises(PoisonFileError, match=msg):
        import_poison(x, torch.arange(6), 6, cfg, y)


def test_folder_import_warns_on_jpeg(tmp_path, capsys):
    x = torch.full((4, 3, 8, 8), 100, dtype=torch.uint8)
    write_folder(tmp_path / "p", x, None, suffix=".jpg")
    import_poison(x, torch.arange(4), 4, PoisonConfig(kind="file", path=str(tmp_path / "p"), eps=16 / 255),
                  torch.zeros(4, dtype=torch.long))
    assert "JPEG/WebP" in capsys.readouterr().err


def test_poison_json_records_the_model_based_run(tmp_path):
    """`pst-dist poison` with EM on the synthetic set stores the surrogate's rounds and train error."""
    out = tmp_path / "em"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "pst_dist.cli", "poison", "--out", str(out), "--data.source=synthetic",
                        "--data.synthetic_train=64", "--data.img_size=16", "--poison.kind=em", "--poison.max_rounds=1",
                        "--poison.steps=2", "--poison.train_steps=2", "--model.name=resnet10t", "--model.width=0.125",
                        "--train.device=cpu"], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    meta = json.loads((out / "poison.json").read_text())
    assert meta["attack"] == "em" and meta["model_based"]["rounds"] == 1 and meta["norms"]["linf"] <= 8 / 255 + 1e-9


# ------------------------------------------------------------------ diagnostics

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
    assert (tmp_path / "diagnose.png").stat().st_size > 1000


def test_em_under_the_trainers_bf16_autocast():
    torch.set_num_threads(1)
    x, y, cfg = tiny("em", 3)
    cfg.train.bf16 = True
    p = gen(x, y, cfg)
    d = p.to(torch.int16) - x.to(torch.int16)
    assert 0 < int(d.abs().max()) <= 8 and LAST_RUN["rounds"] == 2
