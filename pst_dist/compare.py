"""``pst-dist compare``: two ``pst-dist bench`` outputs side by side, paired by (attack, seed), and the adoption rule
with a margin: does recipe B beat recipe A on the worst case over attacks by at least ``margin`` points of
validation accuracy? Or, with ``rule="leximin"``, the worst cases in turn: each side's per-attack means sorted from
the worst; the first rank at which they differ by at least ``margin`` decides (a change that leaves the worst attack
where it is but lifts the next one can be adopted; one that lowers the worst by ``margin`` or more cannot).

Only validation decides. Test accuracy is printed beside it, reported only: a recipe chosen on the test split has
its test figures inflated by the choice. Seeds are paired, so both sides' means are over the same (attack, seed)
cells; a seed only one side has is named and left out, an attack only one side has is refused (the worst case
would be taken over the others). A tie keeps A, at any margin.
"""

from __future__ import annotations

import csv
import math
import statistics
from dataclasses import dataclass
from pathlib import Path

from .data.sources import DataError


@dataclass(frozen=True)
class Cell:
    final_test: float
    peak_test: float
    val: float | None  # final validation accuracy; None where the bench has none (early_stop)


@dataclass(frozen=True)
class AttackRow:
    attack: str
    seeds: list[int]
    val_a: list[float]
    val_b: list[float]
    test_a: list[float]
    test_b: list[float]

    @property
    def diffs(self) -> list[float]:
        return [b - a for a, b in zip(self.val_a, self.val_b, strict=True)]


@dataclass(frozen=True)
class Comparison:
    a: str
    b: str
    defense: str
    margin: float
    rows: list[AttackRow]
    unpaired: list[str]  # "attack seed k (only in A)" for the cells left out
    rule: str = "worst"  # "worst": the worst case alone; "leximin": the worst cases in turn

    def ranked(self, side: str) -> list[tuple[str, float]]:
        """(attack, mean validation accuracy) of every attack, ``side``'s worst first (ties in A's order)."""
        return sorted(((r.attack, statistics.mean(r.val_a if side == "a" else r.val_b)) for r in self.rows),
                      key=lambda x: x[1])

    def worst(self, side: str) -> tuple[str, float]:
        """(attack, mean validation accuracy) of the attack where ``side`` ("a" or "b") is worst."""
        return self.ranked(side)[0]

    @property
    def deciding_rank(self) -> int | None:
        """leximin: the first rank (0 = the worst) at which the sorted means differ by at least the margin (and by
        more than rounding), or None: every rank within it, a tie."""
        for k, ((_, wa), (_, wb)) in enumerate(zip(self.ranked("a"), self.ranked("b"), strict=True)):
            d = 100 * abs(wb - wa)
            if d > 1e-9 and d >= self.margin - 1e-9:
                return k
        return None

    @property
    def gain(self) -> float:
        """B's mean validation accuracy minus A's at the deciding rank, in points: the worst case (rule "worst"),
        or the first rank that differs by the margin (leximin; 0 when none does)."""
        k = 0 if self.rule == "worst" else self.deciding_rank
        return 0.0 if k is None else 100 * (self.ranked("b")[k][1] - self.ranked("a")[k][1])

    @property
    def adopt_b(self) -> bool:
        """B beats A at the deciding rank by at least the margin (a tie keeps A, at any margin)."""
        return self.gain > 1e-9 and self.gain >= self.margin - 1e-9


def read_results(path: Path) -> dict[tuple[str, str, int], Cell]:
    """{(attack, defense, seed): Cell} from a bench's results.csv (``path`` is the file or the bench.out holding
    it). Accuracies must be fractions in [0, 1]; a cell written twice is refused."""
    path = Path(path)
    csv_path = path / "results.csv" if path.is_dir() else path
    if not csv_path.is_file():
        raise DataError(f"{csv_path}: no such results.csv (give a `pst-dist bench` output directory or its "
                        f"results.csv)")
    want = {"attack", "defense", "seed", "final_test_acc", "peak_test_acc", "final_val_acc"}
    cells: dict[tuple[str, str, int], Cell] = {}
    lines: dict[tuple[str, str, int], int] = {}
    try:
        with csv_path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            if missing := want - set(reader.fieldnames or []):
                raise DataError(f"{csv_path}: not a bench results.csv (columns {sorted(missing)} missing)")
            for row in reader:
                where = f"{csv_path} line {reader.line_num}"
                if short := sorted(k for k in want if row.get(k) is None):  # csv gives None past a short row's end
                    given = sum(v is not None for k, v in row.items() if k is not None)
                    raise DataError(f"{where}: {given} of the {len(reader.fieldnames)} columns given, no value for "
                                    f"{short}")
                try:
                    key = (row["attack"], row["defense"], int(row["seed"]))
                    acc = [_fraction(row[k], k) for k in ("final_test_acc", "peak_test_acc")]
                    val = _fraction(row["final_val_acc"], "final_val_acc") if row["final_val_acc"] else None
                except (TypeError, ValueError) as e:
                    raise DataError(f"{where}: {e}") from None
                if key in cells:
                    raise DataError(f"{where}: {key[0]} / {key[1]} / seed {key[2]} again (first on line "
                                    f"{lines[key]}): one row per cell")
                cells[key], lines[key] = Cell(*acc, val), reader.line_num
    except (UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"{csv_path}: not a readable CSV file ({e})") from None
    return cells


def _fraction(text: str, key: str) -> float:
    x = float(text)
    if not (math.isfinite(x) and 0 <= x <= 1):
        raise ValueError(f"{key}={text!r}: an accuracy is a fraction in [0, 1]")
    return x


RULES = ("worst", "leximin")


def compare(a: str | Path, b: str | Path, defense: str = "pst", margin: float = 0.5,
            attacks: list[str] | None = None, rule: str = "worst") -> Comparison:
    """Pair the cells of ``defense`` that both bench outputs hold (optionally only ``attacks``) and compare them."""
    if not math.isfinite(margin) or margin < 0:
        raise DataError(f"--margin {margin}: give a number of percentage points >= 0")
    if rule not in RULES:
        raise DataError(f"--rule {rule!r}: one of {', '.join(RULES)}")
    ca, cb = read_results(Path(a)), read_results(Path(b))
    for name, cells, path in (("A", ca, a), ("B", cb, b)):
        if not any(d == defense for _, d, _ in cells):
            have = sorted({d for _, d, _ in cells})
            raise DataError(f"{name} ({path}) has no cells of defense {defense!r} (it has {', '.join(have) or 'none'})")
    keys_a = [(x, s) for x, d, s in ca if d == defense]  # in A's order: the table's
    keys_b = {(x, s) for x, d, s in cb if d == defense}
    if attacks is not None:
        if unknown := [x for x in attacks if x not in {k[0] for k in [*keys_a, *keys_b]}]:
            raise DataError(f"--attacks {','.join(unknown)}: no such attack in either bench output")
        keys_a = [k for k in keys_a if k[0] in attacks]
        keys_b = {k for k in keys_b if k[0] in attacks}
    attacks_a, attacks_b = {k[0] for k in keys_a}, {k[0] for k in keys_b}
    if only := sorted(attacks_a ^ attacks_b):  # the worst case over the other attacks would not be the worst case
        raise DataError("every attack compared needs a cell on both sides: " + "; ".join(
            f"{x} only in A ({a})" if x in attacks_a else f"{x} only in B ({b})" for x in only)
            + " (run it there, or leave it out with --attacks)")
    unpaired = [f"{x} seed {s} (only in {'A' if (x, s) in set(keys_a) else 'B'})"
                for x, s in sorted(set(keys_a) ^ keys_b)]
    paired = [k for k in keys_a if k in keys_b]
    if lone := sorted(attacks_a - {k[0] for k in paired}):  # both sides have it, but no seed in common
        raise DataError("every attack compared needs a seed on both sides: " + "; ".join(
            f"{x}: A has seed(s) {sorted(s for y, s in keys_a if y == x)}, B {sorted(s for y, s in keys_b if y == x)}"
            for x in lone) + " (run the same seeds on both sides, or leave it out with --attacks)")
    rows = []
    for x in dict.fromkeys(k[0] for k in paired):
        seeds = sorted(s for k, s in paired if k == x)
        for name, cells, path in (("A", ca, a), ("B", cb, b)):
            vals = [cells[(x, defense, s)].val for s in seeds]
            if any(v is None for v in vals):
                raise DataError(f"{name} ({path}) has no validation accuracy for {x} / {defense} (final_val_acc "
                                f"empty; early_stop has none): compare chooses on validation only")
            if not any(vals):
                raise DataError(f"{name} ({path}) has validation accuracy 0 in every {x} / {defense} cell (a "
                                f"bench with data.val_size = 0?): compare chooses on validation only")
        pa = [ca[(x, defense, s)] for s in seeds]
        pb = [cb[(x, defense, s)] for s in seeds]
        rows.append(AttackRow(x, seeds, [c.val for c in pa], [c.val for c in pb], [c.final_test for c in pa],
                              [c.final_test for c in pb]))
    return Comparison(str(a), str(b), defense, margin, rows, unpaired, rule)


def _pct(xs: list[float]) -> str:
    return f"{100 * statistics.mean(xs):.2f}"


def _diff(xs: list[float]) -> str:
    m = 100 * statistics.mean(xs)
    return f"{m:+.2f}" + (f" ± {100 * statistics.stdev(xs):.2f}" if len(xs) > 1 else "")


def paired_t(diffs: list[float]) -> float | None:
    """Student's t of the mean paired difference (None for fewer than 2 pairs or no spread)."""
    if len(diffs) < 2 or (sd := statistics.stdev(diffs)) == 0:
        return None
    return statistics.mean(diffs) / (sd / math.sqrt(len(diffs)))


def format_comparison(c: Comparison) -> str:
    """Markdown: the paired table, the worst case of each side, all pairs pooled, and the decision."""
    lines = [f"A: {c.a}", f"B: {c.b}", f"defense {c.defense}; cells paired by (attack, seed); accuracy in %", "",
             "| attack | seeds | A val | B val | B − A val (mean ± std over seeds) | B better / worse | "
             "A test (report only) | B test (report only) |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in c.rows:
        d = r.diffs
        seeds = ",".join(map(str, r.seeds))
        lines.append(f"| {r.attack} | {seeds} | {_pct(r.val_a)} | {_pct(r.val_b)} | {_diff(d)} | "
                     f"{sum(x > 0 for x in d)} / {sum(x < 0 for x in d)} | {_pct(r.test_a)} | {_pct(r.test_b)} |")
    (xa, wa), (xb, wb) = c.worst("a"), c.worst("b")
    pooled = [x for r in c.rows for x in r.diffs]
    t = paired_t(pooled)
    lines += ["", f"- Worst mean validation accuracy over attacks: A {100 * wa:.2f} ({xa}), B {100 * wb:.2f} ({xb}); "
              f"B − A {100 * (wb - wa):+.2f}.",
              f"- All {len(pooled)} pairs: B − A {100 * statistics.mean(pooled):+.2f} on average"
              + (f", paired t = {t:.2f} ({len(pooled) - 1} df)." if t is not None else ".")]
    if c.unpaired:
        lines.append(f"- Left out, not in both: {'; '.join(c.unpaired)}.")
    gain = f"{c.gain:+.3f}"
    if c.rule == "worst":
        verdict = (f"**adopt B**: its worst case beats A's by {gain} >= {c.margin:.2f}" if c.adopt_b else
                   f"**keep A**: B's worst case gains {gain} on A's (adopting needs a gain > 0 and >= "
                   f"{c.margin:.2f})")
    else:
        ranks = [f"{k + 1}. A {100 * va:.2f} ({xa}), B {100 * vb:.2f} ({xb})"
                 for k, ((xa, va), (xb, vb)) in enumerate(zip(c.ranked("a"), c.ranked("b"), strict=True))]
        lines.append("- Leximin, each side's attacks from its worst: " + "; ".join(ranks) + ".")
        k = c.deciding_rank
        verdict = (f"**keep A**: no rank differs by {c.margin:.2f} or more" if k is None else
                   f"**{'adopt B' if c.adopt_b else 'keep A'}**: rank {k + 1} (the first that differs by the "
                   f"margin, those before within it) gives B {gain} on A")
    lines += [f"- Decision on validation, margin {c.margin:.2f} points: {verdict}.",
              "- Test columns are reported only: choosing on them would be choosing on the test split."]
    return "\n".join(lines)
