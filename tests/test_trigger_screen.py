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


def test_spectral_lists_each_attacks_cached_poisons_and_measures_the_clean_split(tmp_path):
    from pst_dist.config import load_config
    from pst_dist.data.pipeline import build_data
    from pst_dist.pst.detectors import spectral_noise, spectral_shift

    from .conftest import TINY

    spec = importlib.util.spec_from_file_location("trigger_screen", ROOT / "launch" / "trigger_screen.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    for name in ("conv_blur_seed10", "conv_blur_seed2", "conv_blur_seed_old", "em_seed0"):
        (tmp_path / "poisons" / name).mkdir(parents=True)
    found = mod.poisons(tmp_path, ["none", "conv_blur"])
    assert [(a, s) for a, s, _ in found] == [("none", None), ("conv_blur", 2), ("conv_blur", 10)]
    assert found[1][2] == tmp_path / "poisons" / "conv_blur_seed2"
    cfg = load_config(None, [*TINY, "--data.val_size=100"])
    s = build_data(cfg).splits
    x, y = s.train.images, s.train.labels
    assert mod.spectral(cfg, None) == (spectral_shift(x, y, s.val.images, s.val.labels),
                                       spectral_noise(x, y, s.val.labels))
