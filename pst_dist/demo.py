"""The main job: poison the default data set, then train (a) standard on clean data, (b) standard on poisoned data,
(c) PST on poisoned data; print final and peak clean test accuracy and plot the test-accuracy curves."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from .config import ConfigError, config_changes, flat_config, load_config
from .data.sources import FMNIST_DEFAULT
from .engine import engine_class
from .io import check_written_over, read_json, write_atomic
from .metrics import computed_on, run_machines
from .poison.budget import linf_levels
from .report import format_table, plot_curves
from .rundir import RunDirError, written_by_a_run
from .train import train

DEMO_RECIPE = Path(__file__).resolve().parent.parent / "launch" / "configs" / "demo.toml"
DEMO_WRITES = ("results.md", "test_accuracy.png")
"""What the demo writes into ``--out`` beside its runs (replaced only where one of its runs is there too)."""


def conditions() -> dict[str, list[str]]:
    """Overrides per condition; the PST condition keeps the recipe's schedule, the others train standard."""
    standard = ['--schedule.stages=[{name="standard"}]']
    return {
        "clean_standard": ["--poison.kind=none", *standard],
        "poisoned_standard": standard,
        "poisoned_pst": [],
    }


def run_demo(config: str | None, overrides: list[str], out: Path, seeds: int = 1) -> dict[str, list[dict]]:
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ConfigError(f"--seeds {seeds!r}: expected an integer >= 1 (the seeds per condition)")
    recipe = config or str(DEMO_RECIPE)
    base = load_config(recipe, overrides)
    if base.data.source == "fashion-mnist" and not Path(base.data.root or FMNIST_DEFAULT).is_dir():
        print(f"demo: Fashion-MNIST not found at {FMNIST_DEFAULT}; using the synthetic data set instead. Note: the "
              f"recipe's few epochs are tuned for Fashion-MNIST; on the synthetic set the models are still learning "
              f"when they stop, so the table shows the machinery, not the effect (raise --train.epochs for that)")
        overrides = [*overrides, "--data.source=synthetic"]
    check_written_over(out, DEMO_WRITES, any(written_by_a_run(out / f"{label}_seed0") for label in conditions()),
                       option="--out", command="the demo", missing="none of its runs")
    results: dict[str, list[dict]] = {}
    machines: Counter = Counter()  # {machine: runs computed there (a resumed one under each it ran on)}
    for label, extra in conditions().items():
        for seed in range(seeds):
            run_dir = out / f"{label}_seed{seed}"
            cfg = load_config(recipe, [*overrides, *extra, f"--train.seed={seed}", f"--log.run_dir={run_dir}"])
            summary = _finished(run_dir, cfg)
            if summary is not None:
                print(f"demo: {run_dir} already finished with this config, reusing it")
            else:  # continue an interrupted run of the same config; a new run refuses a dir holding another run
                resume = engine_class(cfg).has_checkpoint(run_dir) and (run_dir / "config.toml").is_file()
                print(f"demo: {'resuming' if resume else 'training'} {label} (seed {seed}) -> {run_dir}")
                summary = train(cfg, resume=resume)
            results.setdefault(label, []).append(summary)
            machines.update(run_machines(run_dir))
    table = "\n\n".join([format_table(results), "\n".join(computed_on({d: {"run": n} for d, n in machines.items()}))])
    print("\nClean test accuracy (%), poison: "
          f"{base.poison.kind} eps={linf_levels(base.poison.eps)}/255 patch={base.poison.patch_size}\n")
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
        recorded = load_config(run_dir / "config.toml", recorded=True)
    except ConfigError as e:
        raise RunDirError(f"{run_dir}: finished, but its config.toml cannot be read ({e})") from None
    drop = ("log", "tune", "bench", "train.threads", "data.loader_workers", "data.verify")
    diff = config_changes(flat_config(recorded, drop), flat_config(cfg, drop))
    if diff:
        raise RunDirError(f"{run_dir} holds a finished run of other settings ({diff}); choose another --out or "
                          f"move it away")
    return summary
