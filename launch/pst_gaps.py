"""Issue 17's acceptance, read off a bench's results.csv: per attack, PST's final and peak clean test accuracy against
clean standard training (the ``none`` row's standard cell), PST against JPEG-10, and standard training's final
accuracy, each as mean ± std over seeds; the held-out attack(s) in a table of their own.

    python launch/pst_gaps.py runs/bench_fmnist/results.csv --held-out tap > docs/results/pst_gaps.md

Reads only the test figures the bench recorded (the recipe was chosen on validation accuracy elsewhere)."""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
from collections import defaultdict


def load(path: str) -> dict[tuple[str, str], list[dict]]:
    cells: dict[tuple[str, str], list[dict]] = defaultdict(list)
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if missing := {"attack", "defense", "final_test_acc", "peak_test_acc"} - set(reader.fieldnames or ()):
            sys.exit(f"{path}: no column(s) {sorted(missing)}: not a bench results.csv")
        for line, row in enumerate(reader, start=2):
            for key in ("final_test_acc", "peak_test_acc", "final_val_acc"):
                try:
                    if row.get(key) not in (None, ""):
                        float(row[key])
                except ValueError:
                    sys.exit(f"{path} line {line}: {key}={row[key]!r} is not a number")
            cells[(row["attack"], row["defense"])].append(row)
    return cells


def mean(rows: list[dict], key: str) -> tuple[float, float, int]:
    vals = [100 * float(r[key]) for r in rows if r.get(key) not in (None, "")]
    if not vals:
        return float("nan"), float("nan"), 0
    return statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0, len(vals)


def fmt(m: tuple[float, float, int]) -> str:
    return "—" if m[2] == 0 else f"{m[0]:.1f} ± {m[1]:.1f}"


def gap(v: float) -> str:
    return "—" if v != v else f"{v:+.1f}"  # nan: not run


def table(cells: dict, attacks: list[str], clean: float) -> list[str]:
    lines = ["| attack | standard final | JPEG-10 final | PST final | PST peak | PST final − clean | "
             "PST peak − clean | PST − JPEG-10 | seeds (standard / JPEG-10 / PST) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for a in attacks:
        std = mean(cells.get((a, "standard"), []), "final_test_acc")
        jpg = mean(cells.get((a, "jpeg10"), []), "final_test_acc")
        pf = mean(cells.get((a, "pst"), []), "final_test_acc")
        pp = mean(cells.get((a, "pst"), []), "peak_test_acc")
        lines.append(f"| {a} | {fmt(std)} | {fmt(jpg)} | {fmt(pf)} | {fmt(pp)} | {gap(pf[0] - clean)} | "
                     f"{gap(pp[0] - clean)} | {gap(pf[0] - jpg[0])} | {std[2]} / {jpg[2]} / {pf[2]} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", help="a bench's results.csv (with attack 'none' and defenses standard, jpeg10, pst)")
    ap.add_argument("--held-out", action="append", default=[], help="an attack the recipe was chosen without")
    args = ap.parse_args(argv)
    cells = load(args.results)
    if ("none", "standard") not in cells:
        print(f"{args.results}: no clean standard cell (attack 'none', defense 'standard')", file=sys.stderr)
        return 2
    clean = mean(cells[("none", "standard")], "final_test_acc")[0]
    attacks = list(dict.fromkeys(a for a, _ in cells if a != "none"))
    pst_clean = mean(cells.get(("none", "pst"), []), "final_test_acc")
    if absent := [a for a in args.held_out if a not in attacks]:
        print(f"{args.results}: --held-out {absent}: no such attack in the results ({attacks})", file=sys.stderr)
        return 2
    print(f"Clean standard training, final: {fmt(mean(cells[('none', 'standard')], 'final_test_acc'))} %; PST on "
          f"clean data: {fmt(pst_clean)} % ({gap(pst_clean[0] - clean)}). Accuracies in % (clean test), mean ± std "
          f"over seeds; gaps are differences of means.\n")
    print("\n".join(table(cells, [a for a in attacks if a not in args.held_out], clean)))
    if args.held_out:
        print("\nHeld out of the recipe search (never trained on while choosing):\n")
        print("\n".join(table(cells, [a for a in attacks if a in args.held_out], clean)))
    return 0


if __name__ == "__main__":
    try:  # standard library only: a missing file is one line, not a traceback
        sys.exit(main())
    except OSError as e:
        sys.exit(f"pst_gaps.py: error: {e.filename or ''}: {e.strerror or e}")
