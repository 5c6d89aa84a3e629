from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pst_dist.config import ConfigError, PoisonConfig
from pst_dist.poison import PoisonFileError, apply_poison, class_patterns, import_poison


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
    from pst_dist.poison.budget import l2_budget

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
    from pst_dist.data.pipeline import build_data
    from pst_dist.poison import PoisonFileError

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
    from pst_dist.poison.budget import l2_budget
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
    ({"parameters": {"eps": 1e307}}, r"key 'parameters.eps' = 1e\+307: expected at most 1"),  # 255 eps overflowed
    ('{"format": ' + "9" * 5000 + "}", r"not valid JSON \(ValueError: Exceeds the limit"),  # Python's digit limit
    ("[" * 100_000 + "]" * 100_000, r"not valid JSON \(RecursionError"),
])
def test_stored_poison_metadata_errors(tmp_path, text, match):
    import json

    from pst_dist.poison import PoisonFileError
    from pst_dist.poison.store import read_meta

    (tmp_path / "poison.json").write_text(text if isinstance(text, str) else json.dumps({**_GOOD, **text}))
    with pytest.raises(PoisonFileError, match=match) as e:
        read_meta(tmp_path)
    assert str(tmp_path / "poison.json") in str(e.value) and "\n" not in str(e.value)

# --------------------------------------------------------------------------------------------------------------
# imported poisons (poison.kind=file): arrays of the whole training split, folders of poisoned images

SMALL = ["--data.source=synthetic", "--data.synthetic_train=300", "--data.val_size=60", "--data.img_size=16"]


def cfg_of(*over):
    from pst_dist.config import load_config

    return load_config(None, list(over))


@pytest.mark.parametrize("layout,kind", [("nchw", "float"), ("nhwc", "float"), ("nchw", "uint8")])
def test_imported_poison_matches_the_generated_one(tmp_path, layout, kind):
    ref_cfg = cfg_of(*SMALL, "--poison.kind=classwise_noise")
    from pst_dist.data.pipeline import build_data

    ref = build_data(ref_cfg)
    tr = ref.splits.train
    n_src = ref.splits.source_train_size
    from pst_dist.data.sources import load_splits

    # rebuild the source-ordered clean training split, then its poisoned version, as an outside tool would save it
    clean = torch.zeros((n_src, *ref.splits.shape), dtype=torch.uint8)
    labels = torch.zeros(n_src, dtype=torch.int64)
    full = load_splits(ref_cfg.data)
    for s in (full.train, full.val):
        clean[s.index], labels[s.index] = s.images, s.labels
    delta = class_patterns(ref_cfg.poison, 10, ref.splits.shape)[labels]
    if kind == "float":
        t = delta.float() / 255
    else:
        t = (clean.to(torch.int16) + delta).clamp(0, 255).to(torch.uint8)
    if layout == "nhwc":
        t = t.permute(0, 2, 3, 1).contiguous()
    path = tmp_path / ("p.npy" if kind == "float" else "p.pt")
    np.save(path, t.numpy()) if kind == "float" else torch.save(t, path)
    got = build_data(cfg_of(*SMALL, "--poison.kind=file", f"--poison.path={path}"))
    assert torch.equal(got.poisoned_train, ref.poisoned_train)
    assert torch.equal(got.splits.train.index, tr.index)


# the hand-made malicious pickle below says protocol 4, which torch's weights_only reader warns about before refusing
@pytest.mark.filterwarnings("ignore:Detected pickle protocol 4:UserWarning")
def test_imported_poison_errors(tmp_path):
    from pst_dist.data.pipeline import build_data

    def err(t, name="p.npy", eps=None, match=""):
        path = tmp_path / name
        np.save(path, t) if name.endswith(".npy") else torch.save(t, path)
        over = [*SMALL, "--poison.kind=file", f"--poison.path={path}"] + ([f"--poison.eps={eps}"] if eps else [])
        with pytest.raises(PoisonFileError, match=match):
            build_data(cfg_of(*over))

    err(np.full((360, 3, 16, 16), 0.2, np.float32), match="L-inf 51/255 exceeds poison.eps=0.0313725 .8/255")
    err(np.full((360, 3, 16, 16), 3.0, np.float32), eps=1.0, match=r"\[-1, 1\].*255 units")
    err(np.zeros((360, 3, 16, 16), np.int32), match="dtype")
    err(np.full((360, 3, 16, 16), np.nan, np.float32), match="NaN")
    err({"not": "a tensor"}, name="p.pt", match="expected a tensor")
    (tmp_path / "evil.pt").write_bytes(b"\x80\x04cbuiltins\nexec\n.")
    with pytest.raises(PoisonFileError, match="cannot read"):
        build_data(cfg_of(*SMALL, "--poison.kind=file", f"--poison.path={tmp_path / 'evil.pt'}"))


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
    ("budget", "L-inf 40/255 exceeds poison.eps=0.0313725 .8/255 in whole pixel levels"),
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


def test_a_store_made_when_eps_rounded_to_the_nearest_level_is_still_its_attack_s(tmp_path):
    # before linf_levels an eps of 0.05 (12.75 levels) made 13-level perturbations: not a changed store, but above a
    # reading poison.eps of 0.05 now, which says so with the value given
    from pst_dist.poison.store import _check_budget

    clean = torch.full((2, 1, 4, 4), 100, dtype=torch.uint8)
    stored = clean + 13
    meta = {"attack": "classwise_noise", "parameters": {"eps": 0.05}}
    _check_budget(tmp_path, meta, clean, stored, eps=1.0)
    with pytest.raises(PoisonFileError, match=r"13/255, above poison.eps=0.05 \(12/255 in whole pixel levels"):
        _check_budget(tmp_path, meta, clean, stored, eps=0.05)


def test_norms_and_budget_checks_measured_in_chunks_are_those_of_the_whole_split(monkeypatch):
    """A whole training split is measured chunk by chunk (an ImageNet-sized split as float64 would take ~100 GB):
    chunks of 64 rows over 300 images (the last one short) give the figures of one pass over all of them, to the
    bit, and the L-inf and L0 checks find the largest change wherever it lies."""
    from pst_dist.poison import budget

    g = torch.Generator().manual_seed(0)
    clean = torch.randint(0, 256, (300, 3, 8, 8), dtype=torch.uint8, generator=g)
    delta = torch.randint(-6, 7, clean.shape, dtype=torch.int16, generator=g) * (torch.rand(clean.shape, generator=g)
                                                                                < 0.3)
    poisoned = (clean.to(torch.int16) + delta).clamp(0, 255).to(torch.uint8)
    poisoned[257, 1, 2, 3] = 255 - clean[257, 1, 2, 3] // 2  # the largest change, in the last (short) chunk
    d = poisoned.to(torch.int16) - clean.to(torch.int16)
    l2 = (d.double() / 255).flatten(1).norm(dim=1)
    l0 = (d != 0).any(dim=1).flatten(1).sum(1)
    want = {"linf": float(d.abs().max()) / 255, "l2_mean": float(l2.mean()), "l2_max": float(l2.max()),
            "l0_mean": float(l0.double().mean())}
    monkeypatch.setattr(budget, "CHUNK_VALUES", 1)  # 64 rows a chunk: 5 chunks
    assert len(budget.row_chunks(300, 192)) == 5
    assert budget.norms(clean, poisoned) == want
    assert budget.linf_of(clean, poisoned) == int(d.abs().max()) > 6
    assert budget.l0_max(clean, poisoned) == int(l0.max())
    assert budget.linf_of(clean[:0], poisoned[:0]) == budget.l0_max(clean[:0], poisoned[:0]) == 0


def test_ar_drawn_in_smaller_chunks_is_the_ar_drawn_4096_images_at_a_time(monkeypatch):
    """AR's draws come in chunks of at most CHUNK_VALUES values (ImageNet-sized images) instead of 4096 images:
    the same bytes as the 4096-image code (written out below), also where an image's values are not a multiple of
    16 (torch's normals come in blocks of 16: 1 x 17 x 17 with the crop is 441 values)."""
    from pst_dist.poison import budget, shortcuts

    g = torch.Generator().manual_seed(0)
    n, shape = 300, (1, 17, 17)
    images = torch.randint(0, 256, (n, *shape), dtype=torch.uint8, generator=g)
    labels = torch.arange(n) % 4
    cfg = PoisonConfig(kind="ar")
    c, h, w = shape
    coef = shortcuts.ar_filters(cfg, 4, c)
    draws = torch.Generator().manual_seed(cfg.seed)
    delta = torch.empty(n, c, h, w)
    for s in range(0, n, 4096):  # the code before the chunks (04ae6a5)
        b = slice(s, s + 4096)
        start = torch.randn(len(labels[b]), c, h + shortcuts.AR_CROP, w + shortcuts.AR_CROP, generator=draws)
        delta[b] = shortcuts._ar_process(coef[labels[b]], start)[..., shortcuts.AR_CROP:, shortcuts.AR_CROP:]
    want = (images.to(torch.int16) + shortcuts._to_pixel_levels(delta, budget.l2_budget(cfg, shape))
            ).clamp(0, 255).to(torch.uint8)
    monkeypatch.setattr(shortcuts, "CHUNK_VALUES", 100 * 441)  # 100 images a chunk -> 96: 4 chunks, a short last
    monkeypatch.setattr(shortcuts, "ar_filters", lambda *a: coef)  # the same filters, not searched again
    assert torch.equal(shortcuts.ar(images, labels, cfg, 4), want)


def test_a_rerun_removes_the_partial_output_of_a_killed_write_and_only_that(tmp_path):
    """`pst-dist poison --out X` killed part-way leaves a hidden ``.X.partial-<host>-<pid>/`` (up to the size of the
    poison): a rerun to the same --out removes it when it is this machine's and its process is gone; another
    machine's (a shared file system) or another --out's stays."""
    from pst_dist.io import _machine

    from .conftest import dead_pid, run_cli

    host, dead = _machine(), dead_pid()  # this machine, as pst-dist names it
    stale, kept = tmp_path / f".store.partial-{host}-{dead}", [tmp_path / f".store.partial-elsewhere-{dead}",
                                                               tmp_path / f".other.partial-{host}-{dead}"]
    for d in (stale, *kept):
        d.mkdir()
        (d / "train_images.npy").write_bytes(b"partial")
    out = run_cli("poison", "--data.source=synthetic", "--data.synthetic_train=64", "--data.val_size=16",
                  "--data.img_size=16", "--poison.kind=classwise_noise", "--out", tmp_path / "store")
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"removed {stale.name} from {tmp_path}: left by a write that was killed" in out.stderr
    assert not stale.exists() and all((d / "train_images.npy").read_bytes() == b"partial" for d in kept)
    assert (tmp_path / "store" / "poison.json").is_file()
