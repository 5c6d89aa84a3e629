"""What the training thread asks of the device per step under ``torch.compile``: ``pst-dist train`` against the
compiled bare loop of ``bench/gpu_throughput.py`` (same model, data, batch, crop + flip, optimizer), side by side in
one run, on any machine. A GPU runs ahead of its host only while the host launches work faster than the device does
it; this counts that host work where no GPU is.

    .venv/bin/python bench/host_launches.py [--case resnet18|vit] [--epochs 4] [--out results.jsonl] [-- OVERRIDES]

Both run compiled with a recording backend (``aot_autograd``, graphs run as captured: no kernels built, so it takes
a minute on a CPU) under the torch profiler over epochs 2 .. E-1. Counted per step: calls of compiled graphs, and
ATen calls made outside them at the top level (an op called by another op is that op's work), i.e. what the host
dispatches one by one; then the captured training graphs (forward, backward) compared node for node, and the calls
the trainer makes that the bare loop does not. ``OVERRIDES`` (after ``--``) go to the trainer only, e.g.
``-- --schedule.check_every=20``. The trainer runs in its training thread only (``data.prefetch=0``: each batch gathered
and augmented when asked, as it is on a GPU that holds the training set, ``data.on_device``).
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_throughput as gt  # noqa: E402

import pst_dist.train as trainer  # noqa: E402
from pst_dist.config import load_config  # noqa: E402
from pst_dist.data.pipeline import build_data  # noqa: E402

GRAPH = "compiled graph"
CASES = {  # name -> (model, side, images, batch, model overrides, optimizer, lr): host-bound sizes
    "resnet18": ("resnet18", 8, 512, 8, ["--model.width=0.125"], "sgd", 0.1),
    "vit": ("vit_tiny_patch16_224", 16, 256, 8, ["--model.patch_size=8"], "adamw", 1e-3),
}


class Recorder:
    """A dynamo backend that runs each captured graph as captured (forward and backward through ``aot_autograd``),
    marks its calls in the profiler and keeps each graph's ops."""

    def __init__(self):
        from functorch.compile import make_boxed_func
        from torch._dynamo.backends.common import aot_autograd

        self.graphs: list[collections.Counter] = []

        def record(gm, _example_inputs):
            self.graphs.append(collections.Counter(str(n.target) for n in gm.graph.nodes if n.op == "call_function"))
            run_graph = make_boxed_func(gm.forward)

            def run(args):
                with record_function(GRAPH):
                    return run_graph(args)

            run._boxed_call = True
            return run

        self.backend = aot_autograd(fw_compiler=record, bw_compiler=record)


class Window:
    """An ``on_epoch`` hook that profiles the host from the end of epoch ``first`` to the end of epoch ``last``."""

    def __init__(self, first: int, last: int):
        self.first, self.last, self.prof = first, last, None

    def __call__(self, epoch: int, *_):
        if epoch == self.first:
            self.prof = profile(activities=[ProfilerActivity.CPU])
            self.prof.start()
        elif epoch == self.last and self.prof is not None:
            self.prof.stop()


def top_level_calls(prof) -> collections.Counter:
    """Compiled-graph calls and ATen calls not made from inside another ATen call or a compiled graph."""
    calls: collections.Counter = collections.Counter()
    for e in prof.events():
        if not (e.name.startswith("aten::") or e.name == GRAPH):
            continue
        parent = e.cpu_parent
        while parent is not None and not (parent.name.startswith("aten::") or parent.name == GRAPH):
            parent = parent.cpu_parent
        if parent is None:
            calls[e.name] += 1
    return calls


def per_step(calls: collections.Counter, steps: int) -> dict[str, float]:
    return {k: v / steps for k, v in calls.items()}


def measure(case: str, epochs: int, extra: list[str]) -> dict:
    model, size, n, batch, model_over, optimizer, lr = CASES[case]
    base = [f"--model.name={model}", *model_over]
    over = [*base, "--data.source=synthetic", f"--data.synthetic_train={n}", f"--data.img_size={size}",
            "--data.val_size=64", "--data.probe_size=64", "--data.augment=crop_flip", f"--train.batch_size={batch}",
            f"--train.optimizer={optimizer}", f"--train.lr={lr}", f"--train.eval_every={epochs}",
            "--train.checkpoint_every=0", "--log.tensorboard=false", "--log.progress=false", "--train.device=cpu",
            "--data.prefetch=0", "--train.compile=true", "--train.bf16=false", *extra]
    steps = (epochs - 2) * (n // batch)  # epochs 2 .. E-1
    rec = Recorder()
    saved = dict(trainer.COMPILE_OPTIONS)
    trainer.COMPILE_OPTIONS["backend"] = rec.backend
    build_optimizer = trainer.build_optimizer

    def fused_optimizer(cfg, model, gm):  # the trainer's optimizer and groups with the fused kernel, as on a GPU
        opt = build_optimizer(cfg, model, gm)
        return type(opt)([{**g, "fused": True, "foreach": None} for g in opt.param_groups], fused=True)

    trainer.build_optimizer = fused_optimizer
    try:
        window = Window(1, epochs - 1)
        gt.fresh_compiler()
        with tempfile.TemporaryDirectory() as d:
            cfg = load_config(None, [*over, f"--log.run_dir={Path(d) / 'run'}", f"--train.epochs={epochs}"])
            trainer.train(cfg, data=build_data(cfg), on_epoch=window)
        ours = per_step(top_level_calls(window.prof), steps)
        ours_graphs = rec.graphs[:2]  # the first captured: the training step's forward and backward
    finally:
        trainer.build_optimizer = build_optimizer
        trainer.COMPILE_OPTIONS.clear()
        trainer.COMPILE_OPTIONS.update(saved)
    rec.graphs.clear()
    window = Window(1, epochs - 1)
    compile_ = torch.compile
    gt.torch.compile = lambda m: compile_(m, backend=rec.backend)
    try:
        gt.bare_throughput(base, size, n, batch, epochs, torch.device("cpu"), False, True, False, optimizer, lr,
                           on_epoch=window, fused=True)
    finally:
        gt.torch.compile = compile_
    bare = per_step(top_level_calls(window.prof), steps)
    bare_graphs = rec.graphs[:2]
    total = {k: sum(v for name, v in d.items() if name != GRAPH) for k, d in (("trainer", ours), ("bare", bare))}
    extra_calls = {k: round(ours.get(k, 0) - bare.get(k, 0), 2) for k in set(ours) | set(bare)}
    return {"case": case, "model": model, "size": size, "batch": batch, "steps": steps, "torch": torch.__version__,
            "trainer_overrides": extra,
            "trainer_calls_per_step": total["trainer"], "bare_calls_per_step": total["bare"],
            "calls_ratio": total["trainer"] / total["bare"],
            "trainer_graphs_per_step": ours.get(GRAPH, 0.0), "bare_graphs_per_step": bare.get(GRAPH, 0.0),
            "graph_nodes": {"trainer": [sum(g.values()) for g in ours_graphs],
                            "bare": [sum(g.values()) for g in bare_graphs]},
            "same_graphs": len(ours_graphs) == len(bare_graphs) == 2 and ours_graphs == bare_graphs,
            "bare_calls": dict(sorted(bare.items(), key=lambda kv: -kv[1])),
            "extra_calls": dict(sorted(((k, v) for k, v in extra_calls.items() if abs(v) >= 0.5),
                                       key=lambda kv: -kv[1]))}


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", choices=sorted(CASES), default="resnet18")
    ap.add_argument("--epochs", type=int, default=4, help="epochs per run (>= 3; 2 .. E-1 are counted)")
    ap.add_argument("--out", help="append the result as one JSON line here")
    args = ap.parse_args(argv)
    if args.epochs < 3:
        ap.error(f"--epochs {args.epochs}: need >= 3 (epoch 1 compiles, the last evaluates, those between count)")
    torch.set_num_threads(1)
    row = measure(args.case, args.epochs, extra)
    print(f"{row['case']}: per step, ATen calls outside compiled graphs: trainer {row['trainer_calls_per_step']:.1f}, "
          f"bare loop {row['bare_calls_per_step']:.1f} (x{row['calls_ratio']:.2f}); compiled-graph calls "
          f"{row['trainer_graphs_per_step']:.2f} vs {row['bare_graphs_per_step']:.2f}; training graphs (forward, "
          f"backward nodes) {row['graph_nodes']['trainer']} vs {row['graph_nodes']['bare']}, "
          f"{'the same' if row['same_graphs'] else 'DIFFERENT'}")
    print("  calls the trainer makes beyond the bare loop, per step: "
          + ", ".join(f"{k.removeprefix('aten::')} {v:+.2f}" for k, v in row["extra_calls"].items()))
    if args.out:
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")
    return row


if __name__ == "__main__":
    main()
