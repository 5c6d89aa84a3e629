from pathlib import Path

import pytest
import torch

from pst_dist.config import ConfigError, PoisonConfig
from pst_dist.poison import apply_poison, class_patterns


@pytest.mark.parametrize("kind", ["classwise_noise", "patch_noise"])
@pytest.mark.parametrize("chans", [1, 3])
def test_budget_determinism_classwise(kind, chans):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (60, chans, 12, 12), dtype=torch.uint8, generator=g)
    y = torch.arange(60) % 5
    cfg = PoisonConfig(kind=kind, eps=8 / 255, patch_size=3, seed=1)
    p1, p2 = apply_poison(x, y, cfg, 5), apply_poison(x, y, cfg, 5)
    assert p1.dtype == torch.uint8 and torch.equal(p1, p2)
    d = p1.to(torch.int16) - x.to(torch.int16)
    assert d.abs().max() <= 8
    assert not torch.equal(p1, apply_poison(x, y, PoisonConfig(kind=kind, eps=8 / 255, patch_size=3, seed=2), 5))
    delta = class_patterns(cfg, 5, (chans, 12, 12))
    # away from clipping, the perturbation equals the class pattern: constant within a class
    inside = (x > 10) & (x < 245)
    assert torch.equal(d[inside], delta[y].expand_as(d)[inside])
    if kind == "patch_noise":
        assert torch.equal(delta[:, :, :3, :3], delta[:, :, :1, :1].expand(5, chans, 3, 3))


@pytest.mark.parametrize("eps", [0.0, -0.1, 1.01])
def test_eps_outside_unit_interval(eps):
    with pytest.raises(ConfigError, match="poison.eps"):
        PoisonConfig(kind="patch_noise", eps=eps)


def test_none_is_identity():
    x = torch.randint(0, 256, (4, 1, 8, 8), dtype=torch.uint8)
    assert torch.equal(apply_poison(x, torch.zeros(4, dtype=torch.long), PoisonConfig(), 2), x)


SHORTCUTS = ["lsp", "ar", "ops", "conv_blur"]


def _data(chans: int, n: int = 60, side: int = 12):
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (n, chans, side, side), dtype=torch.uint8, generator=g), torch.arange(n) % 5


@pytest.mark.parametrize("kind", SHORTCUTS)
@pytest.mark.parametrize("chans", [1, 3])
def test_shortcut_attacks_budget_and_determinism(kind, chans):
    from pst_dist.poison.shortcuts import l2_budget

    x, y = _data(chans)
    cfg = PoisonConfig(kind=kind, patch_size=3, seed=1)
    p1, p2 = apply_poison(x, y, cfg, 5), apply_poison(x, y, cfg, 5)
    assert p1.dtype == torch.uint8 and p1.shape == x.shape and torch.equal(p1, p2)
    assert not torch.equal(p1, x)
    other = apply_poison(x, y, PoisonConfig(kind=kind, patch_size=3, seed=2), 5)
    d = (p1.float() - x.float()) / 255
    if kind in ("lsp", "ar"):
        budget = l2_budget(cfg, (chans, 12, 12))
        assert d.flatten(1).norm(dim=1).max() <= budget + 1e-6
        assert d.flatten(1).norm(dim=1).max() >= 0.8 * budget  # uses its budget (clipping takes a little)
        assert not torch.equal(p1, other)
    if kind == "ops":
        assert int((p1 != x).any(dim=1).flatten(1).sum(1).max()) == 1  # L0 = 1
        # one position and colour per class: every changed pixel of a class sits at one place, with one colour
        for k in range(5):
            pos = {int(i) for i in (p1[y == k] != x[y == k]).any(dim=1).flatten(1).float().argmax(1)}
            assert len(pos) == 1
        assert torch.equal(p1, other)  # OPS is a search, not a draw: the seed does not enter it
    if kind == "conv_blur":
        assert not torch.equal(p1, other)
        # class-wise: two images of one class equal before are equal after; the kernel differs between classes
        same = x.clone()
        same[5] = same[0]  # both class 0
        q = apply_poison(same, y, cfg, 5)
        assert torch.equal(q[5], q[0])


def test_lsp_is_constant_within_a_class_and_ar_differs_per_image():
    x = torch.full((20, 3, 16, 16), 128, dtype=torch.uint8)  # mid-grey: no clipping
    y = torch.arange(20) % 2
    lsp = apply_poison(x, y, PoisonConfig(kind="lsp", patch_size=4), 2).to(torch.int16) - 128
    assert torch.equal(lsp[0], lsp[2]) and not torch.equal(lsp[0], lsp[1])
    assert torch.equal(lsp[0, :, :4, :4], lsp[0, :, :1, :1].expand(3, 4, 4))  # constant 4x4 patches
    ar = apply_poison(x, y, PoisonConfig(kind="ar"), 2).to(torch.int16) - 128
    assert not torch.equal(ar[0], ar[2])  # a draw per image from its class's filter


@pytest.mark.parametrize("bad, msg", [("--poison.l2=-1", "poison.l2"), ("--poison.blur_kernel=4", "blur_kernel=4")])
def test_shortcut_config_errors(bad, msg):
    from pst_dist.config import load_config

    with pytest.raises(ConfigError, match=msg):
        load_config(None, ["--poison.kind=lsp", bad])


def test_stored_poison_round_trip_and_validation(tmp_path):
    import json
    import subprocess
    import sys

    import numpy as np

    from pst_dist.config import load_config
    from pst_dist.poison import PoisonFileError
    from pst_dist.train import build_data

    data = ["--data.source=synthetic", "--data.synthetic_train=300", "--data.img_size=12", "--data.num_classes=5",
            "--data.val_from=test", "--data.val_size=20"]  # the synthetic source sizes its split by val_from
    out = tmp_path / "lsp"
    run = subprocess.run([sys.executable, "-m", "pst_dist.cli", "poison", *data, "--poison.kind=lsp",
                          "--poison.patch_size=3", f"--out={out}"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    meta = json.loads((out / "poison.json").read_text())
    assert meta["attack"] == "lsp" and meta["shape"] == [300, 3, 12, 12] and meta["norms"]["l2_max"] > 0
    assert not list(tmp_path.glob(".lsp.partial-*"))
    # training reads it back: the subset it trains on equals generating the class-wise poison on that subset
    cfg = load_config(None, [*data, "--data.train_size=100", "--poison.kind=file", f"--poison.path={out}"])
    d = build_data(cfg)
    ref = apply_poison(d.splits.train.images, d.splits.train.labels,
                       PoisonConfig(kind="lsp", patch_size=3), 5)
    assert torch.equal(d.poisoned_train, ref)
    # a poison made for another data set, and a changed file, are refused with the reason
    other = load_config(None, [*data, "--data.seed=1", "--poison.kind=file", f"--poison.path={out}"])
    with pytest.raises(PoisonFileError, match="does not fit this data set"):
        build_data(other)
    arr = np.load(out / "train_images.npy")
    arr[0, 0, 0, 0] ^= 1
    np.save(out / "train_images.npy", arr)
    with pytest.raises(PoisonFileError, match="changed since it was written"):
        build_data(cfg)
    bad = subprocess.run([sys.executable, "-m", "pst_dist.cli", "poison", *data, f"--out={tmp_path / 'x'}"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "poison.kind='none' is not an attack" in bad.stderr
    assert not (tmp_path / "x").exists()


# --------------------------------------------------------------------------------------------------------------
# a stored poison's metadata and budget, checked when it is read (the CLI side: tests/test_bad_files.py)


def _store(tmp_path, attack: str, clean: torch.Tensor, stored: torch.Tensor, **params) -> Path:
    """A store as `pst-dist poison` writes it, with metadata that agrees with ``stored`` (norms, hash)."""
    import numpy as np

    from pst_dist.poison import norms
    from pst_dist.poison.store import FORMAT, save_dir

    out = tmp_path / attack
    meta = {"format": FORMAT, "attack": attack, "parameters": {"eps": 8 / 255, "l2": 0.0, **params},
            "shape": list(stored.shape), "norms": norms(clean, stored)}
    save_dir(out, {"train_images.npy": lambda f: np.save(f, stored.numpy())}, meta, "poison.json",
             hash_of="train_images.npy")
    return out


@pytest.mark.parametrize("attack, change, match", [
    ("lsp", "l2", r"L2 of the stored perturbation is .* above the budget of the lsp attack"),
    ("ar", "l2", r"L2 of the stored perturbation .* the ar attack"),
    ("ops", "two_pixels", r"changes 2 pixels of some image; the ops attack changes at most 1"),
    ("em", "linf", r"L-inf of the stored perturbation is 9/255, above the budget of the em attack .*8/255"),
])
def test_stored_poison_beyond_its_attacks_budget(tmp_path, attack, change, match):
    from pst_dist.poison import PoisonFileError
    from pst_dist.poison.shortcuts import l2_budget
    from pst_dist.poison.store import read_stored

    clean, _ = _data(3, n=8)
    clean = clean.clamp(40, 200)  # no clipping, no wrap-around: the perturbation is exactly what is added
    d = torch.zeros(clean.shape, dtype=torch.int16)
    if change == "l2":
        budget = l2_budget(PoisonConfig(kind=attack), tuple(clean.shape[1:]))
        d[:, :, :4, :4] = int(budget * 255 / 4) + 2  # 16 pixels x 3 channels: L2 above the budget
    elif change == "two_pixels":
        d[:, 0, 0, 0], d[:, 0, 5, 5] = 9, 9
    else:
        d[:, :, 0, 0] = 9
    stored = (clean.to(torch.int16) + d).to(torch.uint8)
    path = _store(tmp_path, attack, clean, stored)
    with pytest.raises(PoisonFileError, match=match):
        read_stored(path, clean, torch.arange(8), 8, eps=1.0)
    within = (clean.to(torch.int16) + d.clamp(-1, 1) * (change != "two_pixels")).to(torch.uint8)
    ok = _store(tmp_path / "ok", attack, clean, within)
    assert torch.equal(read_stored(ok, clean, torch.arange(8), 8, eps=1.0), within)


def test_stored_conv_blur_says_it_has_no_bound(tmp_path, capsys):
    from pst_dist.poison.store import read_stored

    clean, _ = _data(1, n=4)
    stored = 255 - clean
    read_stored(_store(tmp_path, "conv_blur", clean, stored), clean, torch.arange(4), 4)
    assert "conv_blur has no Lp bound" in capsys.readouterr().err


_GOOD = {"format": "pst-dist-poison/1", "attack": "classwise_noise", "shape": [4, 3, 8, 8],
         "train_images_sha256": "0" * 64, "parameters": {"eps": 8 / 255}, "norms": {"linf": 0.03, "l2_max": 0.5}}


@pytest.mark.parametrize("text, match", [
    ("{not json", "poison.json is not valid JSON"),
    ("[1, 2]", "poison.json is not a JSON object"),
    ({"norms": None}, r"key 'norms' = None: expected a JSON object"),
    ({"shape": "4x3x8x8"}, r"key 'shape' = '4x3x8x8': expected 4 positive integers"),
    ({"shape": [4, 3, 8.0, 8]}, r"key 'shape' = \[4, 3, 8.0, 8\]"),
    ({"attack": "magic"}, r"key 'attack' = 'magic': expected one of"),
    ({"format": None}, r"key 'format' = None"),
    ({"train_images_sha256": 5}, r"key 'train_images_sha256' = 5"),
    ({"parameters": {"eps": "8/255"}}, r"key 'parameters.eps' = '8/255': expected a finite number"),
    ({"norms": {"linf": float("nan"), "l2_max": 0.5}}, r"key 'norms.linf' = nan"),
    ({"attack": "lsp", "parameters": {}}, r"key 'parameters.l2' = None"),
])
def test_stored_poison_metadata_errors(tmp_path, text, match):
    import json

    from pst_dist.poison import PoisonFileError
    from pst_dist.poison.store import read_meta

    (tmp_path / "poison.json").write_text(text if isinstance(text, str) else json.dumps({**_GOOD, **text}))
    with pytest.raises(PoisonFileError, match=match) as e:
        read_meta(tmp_path)
    assert str(tmp_path / "poison.json") in str(e.value) and "\n" not in str(e.value)
