"""launch/trigger_screen.py trajectory: a logged detector key read off cells' metrics.jsonl."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_trajectory_reports_the_maximum_the_nearest_values_and_the_first_crossings(tmp_path):
    spec = importlib.util.spec_from_file_location("trigger_screen", ROOT / "launch" / "trigger_screen.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    cell = tmp_path / "cells" / "conv_blur" / "pst" / "seed1"
    cell.mkdir(parents=True)
    gaps = {20: 0.01, 40: 0.07, 60: 0.03, 80: 0.12, 100: -0.02}
    lines = [{"step": s, "detect/shortcut_gap": g} for s, g in gaps.items()] + [{"step": 100, "train/loss": 1.0}]
    (cell / "metrics.jsonl").write_text("\n".join(map(json.dumps, lines)) + "\n")
    (tmp_path / "cells" / "conv_blur" / "pst" / "seed10").mkdir()
    (tmp_path / "cells" / "conv_blur" / "pst" / "seed_old").mkdir()  # not a seed: left out
    assert [t[1] for t in mod.cells(tmp_path, ["conv_blur"], "pst")] == [1, 10]
    row = mod.trajectory(cell, "detect/shortcut_gap", [45, 100], [0.05, 0.1, 0.2])
    assert row == "0.120 (80) | 0.070@40 / -0.020@100 | 40 / 80 / —"


def test_spectral_lists_each_attacks_cached_poisons_and_measures_each_on_its_poison(tmp_path):
    """poisons(): every attack's poisons/<attack>_seed<k> by seed (not a seed: left out), none first; spectral(): the
    check on the clean split, and on a conv-blur store written by `pst-dist poison` the poisoned images' (more
    class-wise filtered than the clean split's, the same as the check computed on those images directly)."""
    import torch

    from pst_dist.config import dump_toml, load_config
    from pst_dist.data.pipeline import build_data
    from pst_dist.matrix import cell_data_cfg
    from pst_dist.pst.detectors import mean_shift_values, spectral_values

    from .conftest import TINY, run_cli

    spec = importlib.util.spec_from_file_location("trigger_screen", ROOT / "launch" / "trigger_screen.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    for name in ("conv_blur_seed10", "conv_blur_seed_old", "em_seed0"):
        (tmp_path / "poisons" / name).mkdir(parents=True)
    args = [*TINY, "--data.synthetic_train=512", "--data.val_size=200"]
    cfg_file = tmp_path / "tiny.toml"
    cfg_file.write_text(dump_toml(load_config(None, [*args, "--poison.kind=conv_blur"])))
    store = tmp_path / "poisons" / "conv_blur_seed2"
    done = run_cli("poison", "--config", cfg_file, "--out", store)
    assert done.returncode == 0, done.stderr
    found = mod.poisons(tmp_path, ["none", "conv_blur"])
    assert [(a, s) for a, s, _ in found] == [("none", None), ("conv_blur", 2), ("conv_blur", 10)]
    assert found[1][2] == store
    cfg = load_config(None, args)
    s = build_data(cfg).splits
    clean = mod.data_check(cfg, None, spectral_values)
    assert clean == spectral_values(s.train.images, s.train.labels, s.val.images, s.val.labels)
    poisoned = mod.data_check(cfg, store, spectral_values)
    images = build_data(cell_data_cfg(cfg, str(store))).poisoned_train
    assert not torch.equal(images, s.train.images)
    assert poisoned == spectral_values(images, s.train.labels, s.val.images, s.val.labels)
    assert poisoned[0] / poisoned[1] > 2 * clean[0] / clean[1]
    assert mod.data_check(cfg, store, mean_shift_values) == mean_shift_values(images, s.train.labels, s.val.images,
                                                                              s.val.labels)
