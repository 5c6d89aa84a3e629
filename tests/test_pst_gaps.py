"""launch/pst_gaps.py: issue 17's acceptance figures read off a bench's results.csv."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _module():
    spec = importlib.util.spec_from_file_location("pst_gaps", ROOT / "launch" / "pst_gaps.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_gaps_are_differences_of_seed_means_and_the_held_out_attack_stands_apart(tmp_path, capsys):
    rows = ["attack,defense,seed,final_test_acc,peak_test_acc,final_val_acc",
            "none,standard,0,0.86,0.87,0.85", "none,standard,1,0.88,0.88,0.86", "none,pst,0,0.85,0.86,0.84",
            "em,standard,0,0.30,0.50,0.3", "em,jpeg10,0,0.50,0.50,0.5", "em,pst,0,0.83,0.85,0.8",
            "em,pst,1,0.85,0.86,0.8", "tap,pst,0,0.80,0.81,0.8"]
    csv = tmp_path / "results.csv"
    csv.write_text("\n".join(rows) + "\n")
    assert _module().main([str(csv), "--held-out", "tap"]) == 0
    out = capsys.readouterr().out
    assert "Clean standard training, final: 87.0 ± 1.4 %" in out and "PST on clean data: 85.0 ± 0.0 % (-2.0)" in out
    em = next(line for line in out.splitlines() if line.startswith("| em |"))
    assert em.split(" | ")[3:9] == ["84.0 ± 1.4", "85.5 ± 0.7", "-3.0", "-1.5", "+34.0", "1 / 1 / 2 |"]
    head, held = out.split("Held out")
    assert "| tap |" in held and "| tap |" not in head and "| em |" not in held


def test_a_results_file_without_the_clean_standard_cell_is_refused(tmp_path, capsys):
    csv = tmp_path / "results.csv"
    csv.write_text("attack,defense,seed,final_test_acc,peak_test_acc,final_val_acc\nem,pst,0,0.8,0.8,0.8\n")
    assert _module().main([str(csv)]) == 2
    assert "no clean standard cell" in capsys.readouterr().err


def test_several_results_are_read_as_one_and_the_plot_is_drawn_but_never_over_a_foreign_file(tmp_path, capsys):
    from pst_dist.io import is_our_png

    head = "attack,defense,seed,final_test_acc,peak_test_acc,final_val_acc"
    pst, std = tmp_path / "pst.csv", tmp_path / "std.csv"  # PST and the clean reference measured by two benches
    pst.write_text("\n".join([head, "none,pst,0,0.85,0.86,0.84", "em,pst,0,0.83,0.85,0.8", "em,pst,1,0.85,0.86,0.8",
                              "tap,pst,0,0.80,0.81,0.8"]) + "\n")
    std.write_text("\n".join([head, "none,standard,0,0.86,0.87,0.85", "none,standard,1,0.88,0.88,0.86"]) + "\n")
    assert _module().main([str(pst)]) == 2  # alone: no clean reference
    assert "no clean standard cell" in capsys.readouterr().err
    assert _module().main([str(pst), str(std), str(pst)]) == 2  # a seed read twice would count as two
    assert f"{pst}: attack none, defense pst, seed 0 is also in {pst}: give each cell once" in capsys.readouterr().err
    png = tmp_path / "gaps.png"
    assert _module().main([str(pst), str(std), "--held-out", "tap", "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert "Clean standard training, final: 87.0 ± 1.4 %" in out and "| em | — | — | 84.0 ± 1.4 |" in out
    assert is_our_png(png)
    mine = tmp_path / "mine.png"
    mine.write_bytes(b"a user's picture")
    with pytest.raises(SystemExit, match="--plot .*mine.png: exists and is not a plot pst-dist wrote"):
        _module().main([str(pst), str(std), "--plot", str(mine)])
    assert mine.read_bytes() == b"a user's picture"
