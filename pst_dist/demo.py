"""The main job: poison the default data set, then train (a) standard on clean data, (b) standard on poisoned data,
(c) PST on poisoned data; print final and peak clean test accuracy and plot the test-accuracy curves."""

from __future__ import annotations

import statistics
from pathlib import Path

from .config import ConfigError, config_changes, flat_config, load_config
from .data.sources import FMNIST_DEFAULT
from .io import read_json, savefig_atomic, write_atomic
from .rundir import RunDirError
from .train import train

DEMO_RECIPE = Path(__file__).resolve().parent.parent / "launch" / "configs" / "demo.toml"


def conditions() -> dict[str, list[str]]:
    """Overrides per condition; the PST condition keeps the recipe's schedule, the others train standard."""
    standard = ['--schedule.stages=[{name="standard"}]']
    return {
        "clean_standard": ["--poison.kind=none", *standard],
        "poisoned_standard": standard,
        "poisoned_pst": [],
    }


def run_demo(config: str | None, overrides: list[str], out: Path, seeds: int = 1) -> dict[str, list[dict]]:
    recipe = config or str(DEMO_RECIPE)
    base = load_config(recipe, overrides)
    if base.data.source == "fashion-mnist" and not Path(base.data.root or FMNIST_DEFAULT).is_dir():
        print(f"demo: Fashion-MNIST not found at {FMNIST_DEFAULT}; using the synthetic data set instead. Note: the "
              f"recipe's few epochs are tuned for Fashion-MNIST; on the synthetic set the models are still learning "
              f"when they stop, so the table shows the machinery, not the effect (raise --train.epochs for that)")
        overrides = [*overrides, "--data.source=synthetic"]
    results: dict[str, list[dict]] = {}
    for label, extra in conditions().items():
        for seed in range(seeds):
            run_dir = out / f"{label}_seed{seed}"
            cfg = load_config(recipe, [*overrides, *extra, f"--train.seed={seed}", f"--log.run_dir={run_dir}"])
            summary = _finished(run_dir, cfg)
            if summary is not None:
                print(f"demo: {run_dir} already finished with this config, reusing it")
            else:  # continue an interrupted run of the same config; a new run refuses a dir holding another run
                resume = (run_dir / "checkpoint.pt").is_file() and (run_dir / "config.toml").is_file()
                print(f"demo: {'resuming' if resume else 'training'} {label} (seed {seed}) -> {run_dir}")
                summary = train(cfg, resume=resume)
            results.setdefault(label, []).append(summary)
    table = format_table(results)
    print("\nClean test accuracy (%), poison: "
          f"{base.poison.kind} eps={base.poison.eps * 255:.0f}/255 patch={base.poison.patch_size}\n")
    print(table)
    write_atomic(out / "results.md", table + "\n")
    plot_curves(results, out / "test_accuracy.png")
    print(f"\nwrote {out / 'results.md'}, {out / 'test_accuracy.png'}; TensorBoard: tensorboard --logdir {out}")
    return results


def _finished(run_dir: Path, cfg) -> dict | None:
    """The summary of a finished run of exactly ``cfg`` in ``run_dir`` (None when there is none). A finished run of
    another config is refused, naming the differing keys, rather than reported as this one."""

    f = run_dir / "summary.json"
    if not f.is_file():
        return None
    summary = read_json(f, "a run summary", RunDirError)
    if summary.get("status", "finished") != "finished":
        return None  # a failed run: train() refuses the directory and says how to replace it
    try:
        recorded = load_config(run_dir / "config.toml")
    except ConfigError as e:
        raise RunDirError(f"{run_dir}: finished, but its config.toml cannot be read ({e})") from None
    drop = ("log", "tune", "bench", "train.threads", "data.loader_workers", "data.verify")
    diff = config_changes(flat_config(recorded, drop), flat_config(cfg, drop))
    if diff:
        raise RunDirError(f"{run_dir} holds a finished run of other settings ({diff}); choose another --out or "
                          f"move it away")
    return summary


def _mean_std(xs: list[float]) -> str:
    if len(xs) == 1:
        return f"{100 * xs[0]:.1f}"
    return f"{100 * statistics.mean(xs):.1f} ± {100 * statistics.stdev(xs):.1f}"


def format_table(results: dict[str, list[dict]]) -> str:
    rows = ["| condition | seeds | final-epoch test acc | peak test acc | test acc at best val epoch | final val acc |",
            "|---|---:|---:|---:|---:|---:|"]
    for label, runs in results.items():
        rows.append(f"| {label} | {len(runs)} | {_mean_std([r['final_test_acc'] for r in runs])} | "
                    f"{_mean_std([r['peak_test_acc'] for r in runs])} | "
                    f"{_mean_std([r['test_acc_at_best_val'] for r in runs])} | "
                    f"{_mean_std([r['final_val_acc'] for r in runs])} |")
    return "\n".join(rows)


def plot_curves(results: dict[str, list[dict]], path: Path) -> None:
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
    savefig_atomic(fig, path)
    plt.close(fig)
