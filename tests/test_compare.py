"""`pst-dist compare`: two bench outputs paired by (attack, seed), and the worst-case validation rule with a margin.
The bench's own results.csv (tests/test_bench.py) is compared there; here, hand-written ones whose answers are known."""

import csv
from pathlib import Path

import pytest

from pst_dist.compare import compare, format_comparison, paired_t
from tests.conftest import run_cli_in_process

COLUMNS = ["attack", "defense", "seed", "final_test_acc", "peak_test_acc", "final_val_acc"]


def results(path: Path, rows: list[tuple]) -> Path:
    """A bench output directory holding results.csv with ``rows`` (attack, defense, seed, test, val)."""
    path.mkdir(parents=True)
    with (path / "results.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(COLUMNS)
        for attack, defense, seed, test, val in rows:
            w.writerow([attack, defense, seed, test, test, val])
    return path


def test_pairs_by_seed_takes_the_worst_case_and_applies_the_margin(tmp_path):
    a = results(tmp_path / "a", [("lsp", "pst", 0, 0.80, 0.82), ("lsp", "pst", 1, 0.80, 0.84),
                                 ("em", "pst", 0, 0.85, 0.86), ("em", "pst", 1, 0.85, 0.86),
                                 ("em", "pst", 2, 0.85, 0.99),  # only in A: left out of both means
                                 ("lsp", "standard", 0, 0.20, 0.20)])
    b = results(tmp_path / "b", [("lsp", "pst", 0, 0.90, 0.83), ("lsp", "pst", 1, 0.90, 0.85),
                                 ("em", "pst", 0, 0.70, 0.90), ("em", "pst", 1, 0.70, 0.90)])
    c = compare(a, b, margin=1.0)
    assert [r.attack for r in c.rows] == ["lsp", "em"]  # A's order
    assert c.rows[1].seeds == [0, 1] and c.unpaired == ["em seed 2 (only in A)"]
    assert c.worst("a") == ("lsp", pytest.approx(0.83)) and c.worst("b") == ("lsp", pytest.approx(0.84))
    assert c.adopt_b  # +1.00 >= 1.00: the margin is reached exactly
    assert not compare(a, b, margin=1.01).adopt_b
    text = format_comparison(c)
    assert "| lsp | 0,1 | 83.00 | 84.00 | +1.00 ± 0.00 | 2 / 0 | 80.00 | 90.00 |" in text
    assert "A 83.00 (lsp), B 84.00 (lsp); B − A +1.00" in text
    assert "**adopt B**" in text and "em seed 2 (only in A)" in text
    # test accuracy never decides: B's test is far higher on lsp and far lower on em, the verdict is the same
    flipped = results(tmp_path / "b2", [("lsp", "pst", 0, 0.10, 0.83), ("lsp", "pst", 1, 0.10, 0.85),
                                        ("em", "pst", 0, 0.99, 0.90), ("em", "pst", 1, 0.99, 0.90)])
    assert compare(a, flipped, margin=1.0).adopt_b
    # a gain on an attack that is not the worst does not count
    em_only = results(tmp_path / "b3", [("lsp", "pst", 0, 0.8, 0.82), ("lsp", "pst", 1, 0.8, 0.84),
                                        ("em", "pst", 0, 0.9, 0.99), ("em", "pst", 1, 0.9, 0.99)])
    assert "**keep A**: B's worst case gains +0.000 on A's" in format_comparison(compare(a, em_only))
    assert not compare(a, em_only, margin=0).adopt_b  # a tie keeps A
    only = compare(a, b, attacks=["em"])  # restricted to the cells that differ
    assert [r.attack for r in only.rows] == ["em"] and only.worst("b")[1] == pytest.approx(0.90)


def test_leximin_decides_at_the_first_rank_that_differs_by_the_margin(tmp_path):
    """rule="leximin": each side's per-attack means sorted from its worst; ranks within the margin are passed over,
    the first that differs by it decides. A gain below the worst counts; a loss of the margin at the worst does
    not buy one above it."""
    a = results(tmp_path / "a", [("lsp", "pst", 0, 0.8, 0.830), ("ops", "pst", 0, 0.8, 0.850),
                                 ("em", "pst", 0, 0.8, 0.860)])

    def b(name, lsp, ops, em):
        return results(tmp_path / name, [("lsp", "pst", 0, 0.8, lsp), ("ops", "pst", 0, 0.8, ops),
                                         ("em", "pst", 0, 0.8, em)])

    up = b("up", 0.832, 0.850, 0.900)  # worst +0.2 (within 0.5), ops the same, em +4
    worst, lexi = compare(a, up), compare(a, up, rule="leximin")
    assert not worst.adopt_b and lexi.adopt_b and lexi.deciding_rank == 2 and lexi.gain == pytest.approx(4.0)
    text = format_comparison(lexi)
    assert "1. A 83.00 (lsp), B 83.20 (lsp); 2. A 85.00 (ops), B 85.00 (ops); 3. A 86.00 (em), B 90.00 (em)" in text
    assert "**adopt B**: rank 3 (the first that differs by the margin, those before within it) gives B +4.000" in text
    down = compare(a, b("down", 0.824, 0.900, 0.900), rule="leximin")  # the worst -0.6: that decides
    assert down.deciding_rank == 0 and not down.adopt_b and "**keep A**: rank 1" in format_comparison(down)
    # ranks, not attacks: B's worst is ops (82.8, -0.2 on A's worst, lsp: within), its second em (86, +1 on A's
    # second, ops)
    moved = compare(a, b("moved", 0.870, 0.828, 0.860), rule="leximin")
    assert moved.worst("b")[0] == "ops" and moved.deciding_rank == 1 and moved.gain == pytest.approx(1.0)
    assert moved.adopt_b
    same = compare(a, a, rule="leximin")
    assert same.deciding_rank is None and not same.adopt_b and "no rank differs by 0.50" in format_comparison(same)
    assert format_comparison(compare(a, up, rule="worst")) == format_comparison(compare(a, up))  # the default
    r = run_cli_in_process("compare", str(a), str(up), "--rule", "leximin")
    assert r.returncode == 0 and "**adopt B**: rank 3" in r.stdout
    r = run_cli_in_process("compare", str(a), str(up), "--rule", "best")
    assert r.returncode == 2 and "--rule 'best': one of worst, leximin" in r.stderr


def test_paired_t():
    assert paired_t([0.01, 0.03]) == pytest.approx(2.0)
    assert paired_t([0.02]) is None and paired_t([0.01, 0.01]) is None


def test_bad_input_is_named_and_exits_2(tmp_path):
    a = results(tmp_path / "a", [("lsp", "pst", 0, 0.8, 0.82), ("lsp", "early_stop", 0, 0.8, "")])
    b = results(tmp_path / "b", [("em", "pst", 0, 0.8, 0.82), ("lsp", "early_stop", 0, 0.8, "")])
    r = run_cli_in_process("compare", str(a), str(tmp_path / "nowhere"))
    assert r.returncode == 2 and f"{tmp_path / 'nowhere'}: no such results.csv" in r.stderr
    r = run_cli_in_process("compare", str(a), str(b))
    assert r.returncode == 2 and f"em only in B ({b}); lsp only in A ({a})" in r.stderr
    r = run_cli_in_process("compare", str(a), str(b), "--defense", "jpeg10")
    assert r.returncode == 2 and "has no cells of defense 'jpeg10' (it has early_stop, pst)" in r.stderr
    r = run_cli_in_process("compare", str(a), str(b), "--defense", "early_stop")
    assert r.returncode == 2 and "compare chooses on validation only" in r.stderr
    r = run_cli_in_process("compare", str(a), str(a), "--attacks", "lsp,tap")
    assert r.returncode == 2 and "--attacks tap: no such attack" in r.stderr
    for empty in (",", " "):
        r = run_cli_in_process("compare", str(a), str(a), "--attacks", empty)
        assert r.returncode == 2 and f"--attacks {empty!r}: names no attack" in r.stderr, r.stderr[-2000:]
    r = run_cli_in_process("compare", str(a), str(a), "--margin", "-1")
    assert r.returncode == 2 and "--margin -1.0" in r.stderr
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "results.csv").write_text("attack,seed\nlsp,0\n")
    r = run_cli_in_process("compare", str(a), str(tmp_path / "c"))
    assert r.returncode == 2 and "not a bench results.csv" in r.stderr and "final_val_acc" in r.stderr
    (tmp_path / "c" / "results.csv").write_text(",".join(COLUMNS) + "\nlsp,pst,zero,0.8,0.8,0.8\n")
    r = run_cli_in_process("compare", str(a), str(tmp_path / "c" / "results.csv"))
    assert r.returncode == 2 and "results.csv line 2" in r.stderr and "'zero'" in r.stderr
    (tmp_path / "c" / "results.csv").write_text(",".join(COLUMNS) + "\nlsp,pst,0\n")  # a row cut short (was: a
    r = run_cli_in_process("compare", str(a), str(tmp_path / "c" / "results.csv"))  # NoneType error)
    assert r.returncode == 2 and "results.csv line 2: 3 of the 6 columns given, no value for ['final_test_acc', " \
        "'final_val_acc', 'peak_test_acc']" in r.stderr, r.stderr[-2000:]
    bom = tmp_path / "bom" / "results.csv"  # saved again by a spreadsheet, with a byte-order mark
    bom.parent.mkdir()
    bom.write_text("\ufeff" + (a / "results.csv").read_text(), encoding="utf-8")
    for b_side in (a, bom):
        r = run_cli_in_process("compare", str(a), str(b_side))
        assert r.returncode == 0 and "**keep A**" in r.stdout and "B − A +0.00" in r.stdout, r.stderr[-2000:]
    # an attack B has not run: its worst case over the others would not be the worst case
    partial = results(tmp_path / "partial", [("lsp", "pst", 0, 0.8, 0.99)])
    both = results(tmp_path / "both", [("lsp", "pst", 0, 0.8, 0.82), ("em", "pst", 0, 0.8, 0.50)])
    r = run_cli_in_process("compare", str(both), str(partial))
    assert r.returncode == 2 and f"em only in A ({both})" in r.stderr
    assert "**adopt B**" in run_cli_in_process("compare", str(both), str(partial), "--attacks", "lsp").stdout
    # both have OPS, but no seed in common: its figures would be left out of the worst case, which OPS is in B
    a_ops = results(tmp_path / "a_ops", [("em", "pst", 0, 0.8, 0.90), ("ops", "pst", 0, 0.8, 0.20)])
    b_ops = results(tmp_path / "b_ops", [("em", "pst", 0, 0.8, 0.91), ("ops", "pst", 1, 0.8, 0.10)])
    r = run_cli_in_process("compare", str(a_ops), str(b_ops))
    assert r.returncode == 2 and "ops: A has seed(s) [0], B [1]" in r.stderr, r.stdout + r.stderr
    for bad, needle in (("nan", "final_val_acc='nan'"), ("95", "final_val_acc='95': an accuracy is a fraction")):
        (tmp_path / "c" / "results.csv").write_text(",".join(COLUMNS) + f"\nlsp,pst,0,0.8,0.8,{bad}\n")
        r = run_cli_in_process("compare", str(a), str(tmp_path / "c"))
        assert r.returncode == 2 and "line 2" in r.stderr and needle in r.stderr
    (tmp_path / "c" / "results.csv").write_text(",".join(COLUMNS) + "\nlsp,pst,0,0.8,0.8,0.8\nlsp,pst,0,0.8,0.8,0.9\n")
    r = run_cli_in_process("compare", str(a), str(tmp_path / "c"))
    assert r.returncode == 2 and "line 3: lsp / pst / seed 0 again (first on line 2)" in r.stderr
    (tmp_path / "c" / "results.csv").write_text(",".join(COLUMNS) + "\nlsp,pst,0,0.8,0.8,0\n")
    r = run_cli_in_process("compare", str(a), str(tmp_path / "c"))
    assert r.returncode == 2 and "validation accuracy 0 in every lsp / pst cell" in r.stderr
    (tmp_path / "c" / "results.csv").write_bytes(b"\xff\xfe\x00attack")
    r = run_cli_in_process("compare", str(a), str(tmp_path / "c"))
    assert r.returncode == 2 and "not a readable CSV file" in r.stderr
