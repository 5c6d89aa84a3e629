"""Issue 17's acceptance, read off a bench's results.csv: per attack, PST's final and peak clean test accuracy against
clean standard training (the ``none`` row's standard cell), PST against JPEG-10, and standard training's final
accuracy, each as mean ± std over seeds; the held-out attack(s) in a table of their own.

    python launch/pst_gaps.py runs/bench_fmnist/results.csv --held-out tap > docs/results/pst_gaps.md

Several results.csv are read as one (cells measured by separate benches, e.g. PST and the clean standard
reference); ``--plot FILE`` also draws PST's gap to clean per attack, each seed and the mean ± std, against the
2-point bar. Reads only the test figures the bench recorded (the recipe was chosen on validation accuracy
elsewhere)."""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
from collections import defaultdict
from pathlib import Path


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


def plot(cells: dict, attacks: list[str], held_out: list[str], clean: float, path: Path) -> None:
    """PST's final (filled: mean ± std; dots: each seed) and peak (hollow) clean test accuracy minus clean standard
    training's, per attack, worst first; PST on clean data first, against its 1-point bar; the held-out attacks
    last, in their own colour. A file at ``path`` that pst-dist did not write is refused."""
    import matplotlib  # only for --plot: the tables need the standard library alone

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pst_dist.io import PLOT_SOFTWARE, is_our_png, savefig_atomic

    if path.exists() and not is_our_png(path):
        raise SystemExit(f"pst_gaps.py: error: --plot {path}: exists and is not a plot pst-dist wrote (no "
                         f"Software={PLOT_SOFTWARE!r} in it); choose another file")

    def final(a: str) -> float:
        return mean(cells.get((a, "pst"), []), "final_test_acc")[0] - clean

    searched = sorted((a for a in attacks if a not in held_out and cells.get((a, "pst"))), key=final)
    order = (["none"] if cells.get(("none", "pst")) else []) + searched + [a for a in held_out if cells.get((a, "pst"))]
    fig, ax = plt.subplots(figsize=(1.1 * len(order) + 2, 4.2))
    kinds = {"none": ("tab:green", "PST on clean data, final: mean ± std"),
             "held": ("tab:orange", "held out of the search, final: mean ± std"),
             "searched": ("tab:blue", "PST final, mean ± std")}
    labelled: set[str] = set()
    for x, a in enumerate(order):
        rows = cells[(a, "pst")]
        colour, label = kinds["none" if a == "none" else "held" if a in held_out else "searched"]
        seeds = [100 * float(r["final_test_acc"]) - clean for r in rows]
        ax.scatter([x - 0.12] * len(seeds), seeds, s=12, color=colour, alpha=0.45, zorder=2,
                   label=None if "seed" in labelled else "one seed, final")
        m, sd, _ = mean(rows, "final_test_acc")
        ax.errorbar(x, m - clean, yerr=sd, fmt="o", color=colour, capsize=4, zorder=3,
                    label=None if label in labelled else label)
        peak = mean(rows, "peak_test_acc")[0] - clean
        ax.scatter([x + 0.15], [peak], s=30, facecolors="none", edgecolors=colour, zorder=3,
                   label=None if "peak" in labelled else "PST peak, mean")
        labelled |= {"seed", label, "peak"}
    ax.axhline(0, color="black", lw=0.8)
    ax.axhline(-2, color="tab:red", ls="--", lw=1, label="the bar: 2 points below clean")
    if order and order[0] == "none":
        ax.hlines(-1, -0.4, 0.4, color="tab:green", ls="--", lw=1, label="clean data's bar: 1 point")
    ax.set_xticks(range(len(order)), ["clean data" if a == "none" else a for a in order], rotation=20)
    ax.set_ylabel("clean test accuracy − clean standard (points)")
    ax.set_title(f"PST against clean standard training ({clean:.1f} %), each seed and mean ± std", fontsize=10)
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    savefig_atomic(fig, path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", nargs="+", help="a bench's results.csv (with attack 'none' and defenses standard, "
                    "jpeg10, pst); several are read as one")
    ap.add_argument("--held-out", action="append", default=[], help="an attack the recipe was chosen without")
    ap.add_argument("--plot", metavar="FILE", help="also draw the gaps to clean (a PNG)")
    args = ap.parse_args(argv)
    cells: dict[tuple[str, str], list[dict]] = defaultdict(list)
    read_from: dict[tuple[str, str, str], str] = {}  # (attack, defense, seed): the file it was read from
    for path in args.results:
        for key, rows in load(path).items():
            for row in rows:  # a seed counted twice would shrink the spread and count as another seed
                if (cell := (*key, row.get("seed", ""))) in read_from:
                    print(f"{path}: attack {cell[0]}, defense {cell[1]}, seed {cell[2]} is also in "
                          f"{read_from[cell]}: give each cell once", file=sys.stderr)
                    return 2
                read_from[cell] = path
            cells[key].extend(rows)
    where = " + ".join(args.results)
    if ("none", "standard") not in cells:
        print(f"{where}: no clean standard cell (attack 'none', defense 'standard')", file=sys.stderr)
        return 2
    clean = mean(cells[("none", "standard")], "final_test_acc")[0]
    attacks = list(dict.fromkeys(a for a, _ in cells if a != "none"))
    pst_clean = mean(cells.get(("none", "pst"), []), "final_test_acc")
    if absent := [a for a in args.held_out if a not in attacks]:
        print(f"{where}: --held-out {absent}: no such attack in the results ({attacks})", file=sys.stderr)
        return 2
    print(f"Clean standard training, final: {fmt(mean(cells[('none', 'standard')], 'final_test_acc'))} %; PST on "
          f"clean data: {fmt(pst_clean)} % ({gap(pst_clean[0] - clean)}). Accuracies in % (clean test), mean ± std "
          f"over seeds; gaps are differences of means.\n")
    print("\n".join(table(cells, [a for a in attacks if a not in args.held_out], clean)))
    if args.held_out:
        print("\nHeld out of the recipe search (never trained on while choosing):\n")
        print("\n".join(table(cells, [a for a in attacks if a in args.held_out], clean)))
    if args.plot:
        plot(cells, attacks, args.held_out, clean, Path(args.plot))
    return 0


if __name__ == "__main__":
    try:  # standard library only: a missing file is one line, not a traceback
        sys.exit(main())
    except OSError as e:
        sys.exit(f"pst_gaps.py: error: {e.filename or ''}: {e.strerror or e}")
