"""Tables and plots of run summaries: mean ± std over seeds (``pst-dist report``, the demo, the bench)."""

from __future__ import annotations

import statistics
from pathlib import Path

from .io import OutputError, check_parent_dir, is_our_png, savefig_atomic


def mean_std(xs: list[float]) -> str:
    """Accuracies (fractions) as a percentage, mean ± sample std over seeds (the value alone for one seed, a dash
    for none)."""
    if not xs:
        return "—"
    if len(xs) == 1:
        return f"{100 * xs[0]:.1f}"
    return f"{100 * statistics.mean(xs):.1f} ± {100 * statistics.stdev(xs):.1f}"


def ratio_summary(ratios: list[float], of: str = "pairs") -> str:
    """Speed ratios measured side by side (one per alternating pair or block), as the bench scripts print them: the
    median, and with more than one its count and range, e.g. ``x1.01 (median of 3 pairs; range x0.96-x1.24)`` (one
    pair alone moves by about 10 % on a 2-core machine, so one ratio is not a figure)."""
    if not ratios:
        raise ValueError("ratio_summary: no ratios")
    r = sorted(ratios)
    spread = f" (median of {len(r)} {of}; range x{r[0]:.2f}-x{r[-1]:.2f})" if len(r) > 1 else ""
    return f"x{statistics.median(r):.2f}{spread}"


TABLE_KEYS = ("final_test_acc", "peak_test_acc", "test_acc_at_best_val", "final_val_acc")
"""What :func:`format_table` reads from each run's summary."""


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def summary_problem(summary: dict, curve: bool = False) -> str | None:
    """What keeps a finished run's summary out of :func:`format_table` (and, with ``curve``, :func:`plot_curves`),
    or None."""
    for key in TABLE_KEYS:
        if key not in summary:
            return f"no {key} (not a pst-dist run summary?)"
        if not _is_number(v := summary[key]) or not 0 <= v <= 1:
            return f"{key}={v!r}: expected an accuracy in [0, 1] (not a pst-dist run summary?)"
    c = summary.get("test_curve")
    if curve and not (isinstance(c, list) and all(map(_is_number, c))):
        return f"test_curve={c!r}: --plot needs the run's test accuracy per epoch"
    return None


def format_table(results: dict[str, list[dict]]) -> str:
    """Markdown table: one row per label, mean ± std over its runs' summaries (final, peak, at best val, val)."""
    rows = ["| condition | seeds | final-epoch test acc | peak test acc | test acc at best val epoch | final val acc |",
            "|---|---:|---:|---:|---:|---:|"]
    for label, runs in results.items():
        rows.append(f"| {label} | {len(runs)} | {mean_std([r['final_test_acc'] for r in runs])} | "
                    f"{mean_std([r['peak_test_acc'] for r in runs])} | "
                    f"{mean_std([r['test_acc_at_best_val'] for r in runs])} | "
                    f"{mean_std([r['final_val_acc'] for r in runs])} |")
    return "\n".join(rows)


def check_plot_path(path: Path) -> None:
    """``report --plot``: a ``.png`` that is new or one pst-dist wrote (:func:`pst_dist.io.is_our_png`), which it
    replaces; anything else is an OutputError naming it."""
    if path.suffix.lower() != ".png":
        raise OutputError(f"--plot {path}: name a .png file (the curves are written as a PNG)")
    if path.is_symlink() or (path.exists() and not (path.is_file() and is_our_png(path))):
        raise OutputError(f"--plot {path}: exists and is not a plot pst-dist wrote (plots from before pst-dist "
                          f"marked its own carry no mark: remove such a one yourself); choose another --plot")
    check_parent_dir(path, "--plot")


def plot_curves(results: dict[str, list[dict]], path: Path, *, recheck: bool = False) -> None:
    """Clean test accuracy per epoch, one colour per label (seeds fainter), written atomically to ``path``."""
    import matplotlib  # matplotlib: start-up time, only when plotting

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # matplotlib: start-up time, only when plotting

    fig, ax = plt.subplots(figsize=(8, 4), dpi=100)
    for i, (label, runs) in enumerate(results.items()):
        for j, r in enumerate(runs):
            curve = [100 * a for a in r["test_curve"]]
            ax.plot(range(1, len(curve) + 1), curve, color=f"C{i}", alpha=0.9 if j == 0 else 0.5,
                    label=label if j == 0 else None, marker="o", ms=3)
    ax.set_xlabel("epoch")
    ax.set_ylabel("clean test accuracy (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8)
    fig.tight_layout()
    if recheck:  # report --plot: again, for a file put there while the report was read is not replaced
        check_plot_path(path)
    savefig_atomic(fig, path, new=recheck and not (path.exists() or path.is_symlink()))
    plt.close(fig)
