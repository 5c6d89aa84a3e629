"""``pst-dist diagnose``: which layer groups learn the perturbation, and when.

Trains the recipe (its own schedule; ``--standard`` for one standard stage) and after every epoch reads each layer
group's pooled activations on a fixed probe of training images, once poisoned (as trained on) and once clean (the
same images without the poison). Per group and epoch:

- **linear-probe accuracy**: a ridge-regression probe (one-hot targets, standardised features) fitted on one half of
  the probe and scored on the other half. High on poisoned but low on clean images = the group encodes the
  perturbation rather than the object;
- **activation clustering**: k-means (k = classes) on the features, scored by cluster purity against the labels,
  and the between/within-class scatter ratio the PST cluster detector uses.

Written to ``<out>/diagnose.jsonl`` and TensorBoard (``diagnose/...``), plotted to ``<out>/diagnose.png``.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
from pathlib import Path

import torch

from .config import Config, ConfigError
from .data.pipeline import Normalize, build_data
from .distributed import build_device
from .io import PLOT_SOFTWARE, OutputError, check_out_dir, is_our_png, savefig_atomic, write_atomic
from .metrics import close_tensorboard, tb_errors, tensorboard_writer
from .models import build_model, count_groups
from .pst.detectors import scatter_ratio
from .pst.freeze import GroupActivations, eval_mode, trace_units
from .pst.groups import layer_groups
from .pst.schedule import check_stages
from .rundir import LOCK, run_dir_held, written_by_a_run
from .train import resolve_auto, setup_seed, train


def ridge_probe_accuracy(feats: torch.Tensor, labels: torch.Tensor, num_classes: int, lam: float = 1e-2) -> float:
    """Fit on the first half, score on the second: a linear probe in closed form."""
    n = len(labels) // 2
    f = feats.double()
    mu, sd = f[:n].mean(0), f[:n].std(0).clamp_min(1e-6)
    f = torch.cat([(f - mu) / sd, torch.ones(len(f), 1, dtype=f.dtype)], dim=1)
    a, b = f[:n], f[n:]
    t = torch.nn.functional.one_hot(labels[:n], num_classes).double()
    w = torch.linalg.solve(a.T @ a + lam * n * torch.eye(a.shape[1], dtype=f.dtype), a.T @ t)
    return float(((b @ w).argmax(1) == labels[n:]).double().mean())


def kmeans_purity(feats: torch.Tensor, labels: torch.Tensor, k: int, seed: int = 0, iters: int = 30,
                  restarts: int = 4) -> float:
    """k-means (k-means++ starts, seeded; the best of ``restarts`` by inertia) on standardised features; purity =
    share of images whose cluster's majority label is their own (about 1/k for clusters unrelated to the labels)."""
    g = torch.Generator().manual_seed(seed)
    f = feats.double()
    f = (f - f.mean(0)) / f.std(0).clamp_min(1e-6)
    best, best_inertia = None, float("inf")
    for _ in range(restarts):
        centres = f[torch.randint(len(f), (1,), generator=g)]
        for _ in range(1, k):
            d = torch.cdist(f, centres).min(1).values ** 2
            centres = torch.cat([centres, f[torch.multinomial(d / d.sum().clamp_min(1e-12), 1, generator=g)]])
        for _ in range(iters):
            assign = torch.cdist(f, centres).argmin(1)
            for j in range(k):
                members = f[assign == j]
                if len(members):
                    centres[j] = members.mean(0)
        dist = torch.cdist(f, centres)
        assign = dist.argmin(1)
        inertia = float((dist.min(1).values ** 2).sum())
        if inertia < best_inertia:
            best, best_inertia = assign, inertia
    majority = sum(int(torch.bincount(labels[best == j], minlength=k).max()) for j in range(k)
                   if bool((best == j).any()))
    return majority / len(labels)


def group_metrics(gm, x: torch.Tensor, y: torch.Tensor, normalize, num_classes: int) -> dict[int, dict[str, float]]:
    model = gm.model
    feats: dict[int, list[torch.Tensor]] = {}
    with eval_mode(model), torch.no_grad():
        for i in range(0, len(x), 512):
            with GroupActivations(gm) as ga:
                model(normalize(x[i: i + 512]))
            for g, f in ga.acts.items():
                feats.setdefault(g, []).append(f.cpu())
    out = {}
    for g, fs in sorted(feats.items()):
        f = torch.cat(fs)
        out[g] = {"probe_acc": ridge_probe_accuracy(f, y.cpu(), num_classes),
                  "kmeans_purity": kmeans_purity(f, y.cpu(), num_classes),
                  "scatter": float(scatter_ratio(f.double(), y.cpu(), num_classes))}
    return out


DIAGNOSE_FILES = ("diagnose.png", "diagnose.jsonl", "tb", "run")


def _is_diagnose_output(out: Path) -> bool:
    """Whether ``out`` holds what diagnose wrote: each line of its diagnose.jsonl one of its rows (an epoch and the
    probes' measures), its run/ (if any) a pst-dist run, or nothing but the lock a training takes there (a diagnose
    killed before the run's first file). A user's own diagnose.jsonl or tb/ beside it is not."""
    try:
        lines = (out / "diagnose.jsonl").read_text(encoding="utf-8").splitlines()
        rows = [json.loads(line) for line in lines]
    except (OSError, ValueError):
        return False
    run = out / "run"
    return (all(isinstance(r, dict) and "epoch" in r and any(k.startswith(("poisoned/group_", "clean/group_"))
                                                             for k in r) for r in rows)
            and (not run.exists() or run.is_dir() and (written_by_a_run(run)
                                                       or all(p.name == LOCK for p in run.iterdir()))))


def run_diagnose(cfg: Config, out: Path, probe_size: int = 2000, overwrite: bool = False) -> list[dict]:
    """Train ``cfg`` into ``out/run`` and measure every layer group after each epoch (see module docstring). ``out``
    must be new, empty, or an earlier diagnose output (replaced only with ``overwrite``)."""
    # the model's name and the stages' groups, as train() checks them, before --out is touched
    check_stages(cfg.schedule.stages, count_groups(cfg.model), cfg.train.epochs)
    earlier = check_out_dir(out, command="diagnose", marker="diagnose.jsonl", owned=DIAGNOSE_FILES,
                            overwrite=overwrite, is_ours=_is_diagnose_output)
    plot_file = out / "diagnose.png"
    if earlier and plot_file.exists() and not is_our_png(plot_file):
        raise OutputError(f"--out {out}: its diagnose.png is not a plot pst-dist wrote (no Software={PLOT_SOFTWARE!r} "
                          f"in it); move it away or choose another --out")
    cfg.log.run_dir = str(out / "run")
    data = build_data(cfg)
    s = data.splits
    held, poisoned = s.train, data.poisoned_train
    spectral = any(st.trigger is not None and st.trigger.spectral_repair for st in cfg.schedule.stages)
    repairs = [k for k, on in (("trigger.spectral_repair", spectral),
                               ("schedule.mean_repair", cfg.schedule.mean_repair)) if on]
    if repairs:
        print(f"[diagnose] the poisoned probe holds the training images before {' and '.join(repairs)} (the run "
              f"repairs them if its check finds a shortcut there; the mean repair only where the spectral one did "
              f"not fire)", file=sys.stderr)
    if data.stream is not None:  # only its first images are in memory (and, unpoisoned, it trains on them as they are)
        held = data.stream.decode(probe_size)
        poisoned = held.images
    n = min(probe_size, len(held))
    if n < 2 * s.num_classes:
        raise ConfigError(f"--probe-size {probe_size}: a probe of {n} images is too small for {s.num_classes} "
                          f"classes (need >= {2 * s.num_classes})")
    # the run directory's lock from here on: a second diagnose into the same --out (a queue script started twice)
    # is refused before it replaces this one's rows, events or plot, not only once it comes to train
    with run_dir_held(out / "run"):
        return _measure_and_train(cfg, out, data, held, poisoned, n, earlier, overwrite)


def _measure_and_train(cfg: Config, out: Path, data, held, poisoned: torch.Tensor, n: int, earlier: bool,
                       overwrite: bool) -> list[dict]:
    """:func:`run_diagnose` once its inputs are checked, under the run directory's lock: the rows of epoch 0 (an
    untrained network), then training with a row per epoch, then the plot."""
    s = data.splits
    plot_file = out / "diagnose.png"
    if not earlier and (out / "diagnose.jsonl").exists():  # written while this one waited for the lock
        raise OutputError(f"--out {out}: another diagnose wrote its output there while this one waited for its run "
                          f"directory's lock; left as it is: pass --overwrite to replace it, or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    if earlier:  # --overwrite of an earlier diagnose output: its TensorBoard events and plot go (run/ is train()'s
        shutil.rmtree(out / "tb", ignore_errors=True)  # to replace): a diagnose stopped part-way leaves no old plot
        plot_file.unlink(missing_ok=True)  # beside the new rows
    write_atomic(out / "diagnose.jsonl", "")  # first: a diagnose stopped at any point leaves an output it owns
    device = build_device(cfg)
    probe = {"poisoned": poisoned[:n].to(device).float() / 255, "clean": held.images[:n].to(device).float() / 255}
    labels = held.labels[:n]
    normalize = Normalize(data.mean, data.std, device)
    rows: list[dict] = []
    tb = tensorboard_writer(out / "tb")

    def on_epoch(epoch, logs, gm, engine=None):
        row = {"epoch": epoch, "stage": logs.get("pst/stage"), "test_acc": logs.get("eval/test_acc"), "probe_images": n}
        for which, x in probe.items():
            for g, m in group_metrics(gm, x, labels, normalize, s.num_classes).items():
                for k, v in m.items():
                    row[f"{which}/group_{g}/{k}"] = v
                    with tb_errors(tb):
                        tb.add_scalar(f"diagnose/{which}/{k}/group_{g}", v, epoch)
        rows.append(row)
        print(f"[diagnose] epoch {epoch}: linear probe poisoned/clean per group " + ", ".join(
            f"g{g} {row[f'poisoned/group_{g}/probe_acc']:.2f}/{row[f'clean/group_{g}/probe_acc']:.2f}"
            for g in range(len(gm.groups)) if f"clean/group_{g}/probe_acc" in row), file=sys.stderr)
        write_atomic(out / "diagnose.jsonl", "".join(json.dumps(r) + "\n" for r in rows))

    try:
        # epoch 0: an untrained network from the same factory and seed: what random features already separate
        setup_seed(cfg, resolve_auto(cfg, device))
        model0 = build_model(cfg.model, s.num_classes, s.shape[0], s.shape[1]).to(device)
        gm0 = trace_units(model0, layer_groups(model0, cfg.model.block_groups), probe["clean"][:2])
        on_epoch(0, {"pst/stage": 0}, gm0)
        del model0, gm0
        train(cfg, data=data, on_epoch=on_epoch, overwrite=overwrite)
    except BaseException:
        with contextlib.suppress(OSError):  # the error that stopped it is the one to report
            tb.close()
        raise
    close_tensorboard(tb)
    plot(rows, out / "diagnose.png", title=f"{cfg.poison.kind} poison, {cfg.model.name}")
    return rows


def plot(rows: list[dict], path: Path, title: str = "") -> None:
    import matplotlib  # matplotlib: start-up time, only when plotting

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # matplotlib: start-up time, only when plotting

    groups = sorted({int(k.split("/")[1].split("_")[1]) for k in rows[0] if k.startswith("poisoned/group_")})
    epochs = [r["epoch"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4), dpi=80)
    for ax, metric, name in ((axes[0], "probe_acc", "linear-probe accuracy"),
                             (axes[1], "kmeans_purity", "k-means cluster purity")):
        for g in groups:
            for which, style in (("poisoned", "-"), ("clean", "--")):
                ax.plot(epochs, [100 * r[f"{which}/group_{g}/{metric}"] for r in rows], style, color=f"C{g}",
                        marker="o", ms=3, label=f"group {g} {which}")
        ax.set_xlabel("epoch")
        ax.set_ylabel(f"{name} (%)")
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    axes[1].legend(fontsize=6, ncol=2, loc="lower right")
    fig.suptitle(f"{title}: per-group features on poisoned (solid) vs clean (dashed) training images", fontsize=9)
    fig.tight_layout()
    savefig_atomic(fig, path)
    plt.close(fig)
