"""Poisons in the field's published formats (Unlearnable-Examples perturbation.pt, APBench's exports, `pst-dist poison
--import`) and partial poisoning (poison.ratio), on a tiny synthetic data set."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pst_dist.config import ConfigError, PoisonConfig, load_config
from pst_dist.data.pipeline import build_data
from pst_dist.data.sources import load_splits
from pst_dist.poison import PoisonFileError, poisoned_mask

from .conftest import TINY

SOURCE = 320  # TINY: 256 training images + the 64 validation images carved from the source's training split
K = 10  # the synthetic source's classes


def cfg_of(*over):
    return load_config(None, [*TINY, *over])


def source_train(cfg=None):
    """The clean training split of TINY's source, in the source's own order (what outside tools poison)."""
    full = load_splits((cfg or cfg_of()).data)
    images = torch.zeros((SOURCE, *full.shape), dtype=torch.uint8)
    labels = torch.zeros(SOURCE, dtype=torch.int64)
    for s in (full.train, full.val):
        images[s.index], labels[s.index] = s.images, s.labels
    return images, labels


def ue_perturbation(rows: int, seed: int = 0, eps: float = 8 / 255) -> torch.Tensor:
    """A float32 tensor of offsets in [-eps, eps] ([0, 1] pixel units), rows x 3 x 16 x 16, as UE's
    perturbation.py saves it (torch.save of the noise tensor)."""
    g = torch.Generator().manual_seed(seed)
    return ((torch.rand((rows, 3, 16, 16), generator=g) * 2 - 1) * eps).float()


def ue_dataset_py(clean_nchw: torch.Tensor, labels: torch.Tensor, perturb: torch.Tensor, classwise: bool):
    """Unlearnable-Examples' dataset.py (PoisonCIFAR10.__init__, poison_rate 1), transcribed: the poisoned uint8
    images it trains on (N x H x W x C there; returned as N x C x H x W)."""
    noise_all = perturb.mul(255).clamp_(0, 255).permute(0, 2, 3, 1).to("cpu").numpy()
    data = clean_nchw.permute(0, 2, 3, 1).numpy().astype(np.float32)
    for idx in range(len(data)):
        noise = noise_all[int(labels[idx])] if classwise else noise_all[idx]
        data[idx] = data[idx] + noise
        data[idx] = np.clip(data[idx], a_min=0, a_max=255)
    return torch.from_numpy(data.astype(np.uint8)).permute(0, 3, 1, 2)


@pytest.mark.parametrize("classwise", [True, False], ids=["classwise", "samplewise"])
def test_ue_perturbation_applied_as_ue_and_signed(tmp_path, classwise):
    clean, labels = source_train()
    d = ue_perturbation(K if classwise else SOURCE)
    torch.save(d, tmp_path / "perturbation.pt")
    file = ["--poison.kind=file", f"--poison.path={tmp_path / 'perturbation.pt'}"]
    got = build_data(cfg_of(*file, "--poison.offsets=ue"))
    idx = got.splits.train.index
    assert torch.equal(got.poisoned_train, ue_dataset_py(clean, labels, d, classwise)[idx])  # UE's own images
    signed = build_data(cfg_of(*file)).poisoned_train
    per_image = d[labels] if classwise else d
    want = (clean.double() + per_image.double() * 255).round().clamp(0, 255).to(torch.uint8)
    assert torch.equal(signed, want[idx])
    assert (signed.int() < got.splits.train.images.int()).any(), "signed offsets lower pixels too"
    assert not (got.poisoned_train.int() < got.splits.train.images.int()).any(), "UE drops negative offsets"


@pytest.mark.parametrize("classwise", [True, False], ids=["classwise", "samplewise"])
def test_ue_perturbation_trains(tmp_path, classwise):
    from pst_dist.train import train

    torch.save(ue_perturbation(K if classwise else SOURCE), tmp_path / "perturbation.pt")
    s = train(cfg_of("--poison.kind=file", f"--poison.path={tmp_path / 'perturbation.pt'}", "--train.epochs=1",
                     f"--log.run_dir={tmp_path / 'run'}", "--log.tensorboard=false"))
    assert s["status"] == "finished" and 0 <= s["final_test_acc"] <= 1
    assert "perturbation.pt" in (tmp_path / "run" / "config.toml").read_text()


@pytest.mark.parametrize("tensor,msg", [
    (ue_perturbation(7), r"7 rows: expected N = 320 \(one per image .*\) or K = 10 \(class-wise"),
    (ue_perturbation(K)[:, :, :8], r"shape mismatch: expected .*\(rows, 3, 16, 16\).* found \(10, 3, 8, 16\)"),
    (ue_perturbation(K, eps=16 / 255), "L-inf 16/255 exceeds poison.eps=0.0313725 .8/255 in whole pixel levels"),
    (ue_perturbation(K, eps=2.0), r"must lie in \[-1, 1\].*found \|max\| 2 "),
    (ue_perturbation(K)[None].repeat(2, 1, 1, 1, 1), "5-D shape .*several perturbation sets"),
    (torch.zeros((K, 3, 16, 16), dtype=torch.uint8), "uint8 with 10 rows: .*class-wise files hold float offsets"),
])
def test_bad_ue_files_name_the_value(tmp_path, tensor, msg):
    torch.save(tensor, tmp_path / "perturbation.pt")
    with pytest.raises(PoisonFileError, match=msg):
        build_data(cfg_of("--poison.kind=file", f"--poison.path={tmp_path / 'perturbation.pt'}"))


# ---------------------------------------------------------------------------------------------------------------
# APBench: <attack>_poisons/<dataset>/data/<row>.png (most attacks), TAP's numpy export

def poisoned_source(seed: int = 0):
    clean, labels = source_train()
    g = torch.Generator().manual_seed(seed)
    return clean, labels, (clean.int() + torch.randint(-8, 9, clean.shape, generator=g)).clamp(0, 255).to(torch.uint8)


def test_apbench_png_export(tmp_path):
    _, _, poisoned = poisoned_source()
    root = tmp_path / "em_poisons" / "c10"
    (root / "data").mkdir(parents=True)
    for i, im in enumerate(poisoned):  # APBench's export_poison: str(idx) + ".png", no zero padding
        Image.fromarray(im.permute(1, 2, 0).numpy()).save(root / "data" / f"{i}.png")
    got = build_data(cfg_of("--poison.kind=file", f"--poison.path={root}"))
    assert torch.equal(got.poisoned_train, poisoned[got.splits.train.index])


def write_apbench_numpy(directory: Path, images: torch.Tensor, labels: torch.Tensor) -> None:
    """As APBench's TAP export (furnace.py, mode "numpy"): float64 N x H x W x 3 pixels, float64 labels."""
    directory.mkdir(parents=True, exist_ok=True)
    np.save(directory / "poisoned_training_data.npy", images.permute(0, 2, 3, 1).numpy().astype(np.float64))
    np.save(directory / "poisoned_training_labels.npy", labels.numpy().astype(np.float64))


def test_apbench_numpy_export(tmp_path):
    _, labels, poisoned = poisoned_source()
    write_apbench_numpy(tmp_path / "tap", poisoned, labels)
    for path in (tmp_path / "tap", tmp_path / "tap" / "poisoned_training_data.npy"):
        got = build_data(cfg_of("--poison.kind=file", f"--poison.path={path}"))
        assert torch.equal(got.poisoned_train, poisoned[got.splits.train.index])
    wrong = labels.clone()
    wrong[got.splits.train.index[0]] = (wrong[got.splits.train.index[0]] + 1) % K
    write_apbench_numpy(tmp_path / "bad_labels", poisoned, wrong)
    with pytest.raises(PoisonFileError, match=f"row {int(got.splits.train.index[0])} has label"):
        build_data(cfg_of("--poison.kind=file", f"--poison.path={tmp_path / 'bad_labels'}"))
    write_apbench_numpy(tmp_path / "bad_pixels", poisoned.double() / 255, labels)  # [0, 1] floats, not pixels
    with pytest.raises(PoisonFileError, match="whole pixel values in 0..255"):
        build_data(cfg_of("--poison.kind=file", f"--poison.path={tmp_path / 'bad_pixels'}"))
    write_apbench_numpy(tmp_path / "complex", poisoned, labels)  # whole pixels, but complex (numpy drops the i part)
    f = tmp_path / "complex" / "poisoned_training_data.npy"
    np.save(f, np.load(f).astype(np.complex128) + 3j)
    with pytest.raises(PoisonFileError, match="complex128"):
        build_data(cfg_of("--poison.kind=file", f"--poison.path={tmp_path / 'complex'}"))


# ---------------------------------------------------------------------------------------------------------------
# pst-dist poison --import

def test_poison_import_stores_a_checked_poison(tmp_path, capsys):
    from pst_dist.cli import main

    torch.save(ue_perturbation(K), tmp_path / "perturbation.pt")
    assert main(["poison", "--import", str(tmp_path / "perturbation.pt"), "--out", str(tmp_path / "store"),
                 *TINY]) == 0
    assert "imported" in capsys.readouterr().out
    direct = build_data(cfg_of("--poison.kind=file", f"--poison.path={tmp_path / 'perturbation.pt'}"))
    stored = build_data(cfg_of("--poison.kind=file", f"--poison.path={tmp_path / 'store'}"))
    assert torch.equal(stored.poisoned_train, direct.poisoned_train)
    torch.save(ue_perturbation(K, eps=16 / 255), tmp_path / "big.pt")
    assert main(["poison", "--import", str(tmp_path / "big.pt"), "--out", str(tmp_path / "big"), *TINY]) == 2
    assert "L-inf 16/255 exceeds poison.eps=0.0313725 (8/255 in whole pixel levels" in capsys.readouterr().err
    assert not (tmp_path / "big").exists()
    # the store keeps the budget check: read under a smaller poison.eps it is refused
    with pytest.raises(PoisonFileError, match="poison.eps"):
        build_data(cfg_of("--poison.kind=file", f"--poison.path={tmp_path / 'store'}", "--poison.eps=0.01"))


# ---------------------------------------------------------------------------------------------------------------
# poison.ratio

def poisoned_rows(data) -> torch.Tensor:
    """Source rows of the training images that differ from the clean ones."""
    tr = data.splits.train
    return tr.index[(data.poisoned_train != tr.images).flatten(1).any(1)]


@pytest.mark.parametrize("kind", ["classwise_noise", "ue_file", "store"])
def test_ratio_poisons_exactly_that_fraction_reproducibly(tmp_path, capsys, kind):
    if kind == "classwise_noise":
        over = ["--poison.kind=classwise_noise"]
    elif kind == "ue_file":
        torch.save(ue_perturbation(K, eps=8 / 255).abs().clamp_min(1 / 255), tmp_path / "p.pt")  # every image moves
        over = ["--poison.kind=file", f"--poison.path={tmp_path / 'p.pt'}"]
    else:  # a stored poison, as `pst-dist poison` writes it and the bench caches it
        from pst_dist.data.pipeline import write_poisoned

        write_poisoned(cfg_of("--poison.kind=classwise_noise"), tmp_path / "store", log=lambda m: None)
        over = ["--poison.kind=file", f"--poison.path={tmp_path / 'store'}"]
    capsys.readouterr()
    full = poisoned_rows(build_data(cfg_of(*over)))
    assert len(full) == 256
    said = "on all 256 training images" + (f" from {tmp_path}" if "file" in over[0] else " (poison.seed=0)")
    assert said in capsys.readouterr().err  # which poison the run reads, at every ratio
    half = build_data(cfg_of(*over, "--poison.ratio=0.5"))
    rows = poisoned_rows(half)
    assert len(rows) == 128, "exactly half of the 256 training images"
    assert "128 of 256 training images poisoned" in capsys.readouterr().err
    clean_rows = ~torch.isin(half.splits.train.index, rows)
    assert torch.equal(half.poisoned_train[clean_rows], half.splits.train.images[clean_rows])
    assert torch.equal(poisoned_rows(build_data(cfg_of(*over, "--poison.ratio=0.5"))), rows), "same rows again"
    other = poisoned_rows(build_data(cfg_of(*over, "--poison.ratio=0.5", "--poison.seed=1")))
    assert len(other) == 128 and not torch.equal(other.sort().values, rows.sort().values), "another seed"
    quarter = poisoned_rows(build_data(cfg_of(*over, "--poison.ratio=0.25")))
    assert len(quarter) == 64 and torch.isin(quarter, rows).all(), "a smaller ratio poisons a subset"


def test_ratio_rows_depend_on_the_source_rows_not_their_order():
    index = torch.randperm(SOURCE)[:100]
    mask = poisoned_mask(index, SOURCE, 0.3, seed=4)
    assert int(mask.sum()) == 30
    perm = torch.randperm(100)
    assert torch.equal(poisoned_mask(index[perm], SOURCE, 0.3, seed=4), mask[perm])


@pytest.mark.parametrize("ratio", [0.0, -0.5, 1.5, float("nan")])
def test_ratio_outside_unit_interval_refused(ratio):
    with pytest.raises(ConfigError, match=f"poison.ratio={ratio}: must lie in"):
        PoisonConfig(kind="classwise_noise", ratio=ratio)
    with pytest.raises(ConfigError, match="poison.ratio"):
        cfg_of("--poison.kind=classwise_noise", f"--poison.ratio={ratio}")


def test_ratio_travels_with_the_config():
    """tune trials and bench cells rebuild their config from its dict (tune/trial.py, pst_dist.matrix)."""
    from pst_dist.config import Config, dump_toml, from_dict, to_dict

    cfg = cfg_of("--poison.kind=classwise_noise", "--poison.ratio=0.5")
    assert from_dict(Config, to_dict(cfg)).poison.ratio == 0.5
    assert "ratio = 0.5" in dump_toml(cfg)


def test_ratio_that_poisons_nothing_refused():
    with pytest.raises(ConfigError, match=r"poison.ratio=0.001 poisons none of the 256 training images"):
        build_data(cfg_of("--poison.kind=classwise_noise", "--poison.ratio=0.001"))


def test_bench_cache_is_reused_across_ratios_and_cells_are_not(tmp_path):
    import pst_dist.matrix as m
    from pst_dist.config import dump_toml

    tiny = str(Path(__file__).parent / "configs" / "bench_tiny.toml")
    one = [f"--bench.out={tmp_path}", '--bench.attacks=["classwise_noise"]', '--bench.defenses=["standard"]',
           "--bench.seeds=1"]
    b = m.plan_bench(tiny, one)
    m.generate_poison(b.base, "classwise_noise", 0, str(b.poison_dir("classwise_noise", 0)), 1)
    half = m.plan_bench(tiny, [*one, "--poison.ratio=0.5"])
    gen, todo = m.cached_poisons(half)
    assert list(gen) == [("classwise_noise", 0)] and not todo, "the cache holds every image poisoned"
    with pytest.raises(ConfigError, match="made with other poison settings"):
        m.cached_poisons(m.plan_bench(tiny, [*one, "--poison.eps=0.05"]))
    cell = m.cell_cfg(half.base, "classwise_noise", "standard", 0, tmp_path)
    data = build_data(m.cell_data_cfg(cell, str(half.poison_dir("classwise_noise", 0))))
    assert len(poisoned_rows(data)) == len(data.splits.train) // 2
    run_dir = Path(cell.log.run_dir)  # a cell begun with ratio 1 is a changed recipe under ratio 0.5
    run_dir.mkdir(parents=True)
    (run_dir / "config.toml").write_text(dump_toml(m.cell_cfg(b.base, "classwise_noise", "standard", 0, tmp_path)))
    assert m.recipe_change(run_dir, cell) == {"poison.ratio": (1.0, 0.5)}


def test_poison_import_of_a_store_is_refused_naming_it_and_a_ratio_is_named_in_the_hint(tmp_path, capsys):
    # a copy would be recorded as attack 'file' under poison.eps, which an L2 store (lsp) exceeds: unreadable after
    from pst_dist.cli import main

    assert main(["poison", "--out", str(tmp_path / "lsp"), *TINY, "--poison.kind=lsp", "--poison.ratio=0.5"]) == 0
    out, err = capsys.readouterr()
    assert f"--poison.path={tmp_path / 'lsp'} --poison.ratio=0.5" in out and "stored every image poisoned" in err
    assert main(["poison", "--import", str(tmp_path / "lsp"), "--out", str(tmp_path / "copy"), *TINY]) == 2
    assert "already a pst-dist poison store" in capsys.readouterr().err and not (tmp_path / "copy").exists()
