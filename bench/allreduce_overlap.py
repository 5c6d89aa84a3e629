"""Gradient all-reduce of the plain torch engine on 2 gloo processes: one all-reduce per parameter after backward
(the old path) vs :class:`pst_dist.distributed.GradBuckets` (buckets all-reduced during backward), side by side.

  .venv/bin/python bench/allreduce_overlap.py [--steps 24] [--bucket-mb 25,1,0.25] [--threads 1] [--batch 64]

Starts itself under torchrun (2 processes, gloo, ``--threads`` torch threads each). Every rank trains the same
resnet18 x0.25 (32 px, AdamW, one param group per layer group, all groups trainable) once per variant, from the same
weights on the same batch, timed in 4 alternating blocks so that drift hits every variant; rank 0 prints ms/step,
the ratio to the per-parameter path and the range of the blocks' ratios. A bucket as large as the whole model is
one all-reduce after backward (nothing to overlap); smaller buckets start during backward.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from pst_dist.config import ModelConfig  # noqa: E402
from pst_dist.distributed import all_reduce_grads, init_distributed, mean_across_ranks, teardown  # noqa: E402
from pst_dist.engine import TorchEngine  # noqa: E402
from pst_dist.models import build_model  # noqa: E402
from pst_dist.pst.freeze import drop_frozen_grads, param_groups, trace_units  # noqa: E402
from pst_dist.pst.groups import layer_groups  # noqa: E402
from pst_dist.report import ratio_summary  # noqa: E402


class PerParameter:
    """The old path: backward, then one blocking all-reduce per parameter, then the optimizer step."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, world_size: int):
        self.module, self.optimizer, self.world_size = model, optimizer, world_size

    def backward(self, loss: torch.Tensor, mults: tuple[float, ...]) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()

    def step(self, mults: tuple[float, ...]) -> None:
        drop_frozen_grads(self.optimizer, mults)
        all_reduce_grads(self.module.parameters(), self.world_size)
        self.optimizer.step()


def build(model: torch.nn.Module, world_size: int, bucket_mb: float | None):
    model = copy.deepcopy(model)
    gm = trace_units(model, layer_groups(model), torch.zeros(2, 3, 32, 32))
    opt = torch.optim.AdamW(param_groups(model, gm.groups, 1e-3, 0.05), lr=1e-3)
    engine = PerParameter(model, opt, world_size) if bucket_mb is None else \
        TorchEngine(model, opt, world_size, bucket_mb=bucket_mb)
    return engine, (1.0,) * gm.num_groups


def run_steps(engine, mults, x, y, n: int) -> float:
    t = time.perf_counter()
    for _ in range(n):
        loss = torch.nn.functional.cross_entropy(engine.module(x), y)
        engine.backward(loss, mults)
        engine.step(mults)
    return time.perf_counter() - t


def worker(args) -> None:
    info = init_distributed("cpu")
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="resnet18", width=0.25), 10, 3, 32)
    sizes = [float(s) for s in args.bucket_mb.split(",")]
    variants = {"per-parameter": build(model, info.world_size, None)}
    variants |= {f"buckets {s:g} MB": build(model, info.world_size, s) for s in sizes}
    g = torch.Generator().manual_seed(info.rank)
    x, y = torch.rand(args.batch, 3, 32, 32, generator=g), torch.randint(0, 10, (args.batch,), generator=g)
    for engine, mults in variants.values():  # warm-up
        run_steps(engine, mults, x, y, 3)
    block = max(1, args.steps // 4)
    blocks = {name: [] for name in variants}  # seconds of each block, the mean over the ranks
    for _ in range(4):
        for name, (engine, mults) in variants.items():
            blocks[name].append(mean_across_ranks(run_steps(engine, mults, x, y, block)))
    ms = {name: 1000 * sum(t) / (4 * block) for name, t in blocks.items()}
    megabytes = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    if info.is_primary:
        print(json.dumps({"ms_per_step": ms, "block_s": blocks, "grad_mb": megabytes,
                          "params": len(list(model.parameters()))}), flush=True)
    teardown()


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=24, help="timed steps per variant")
    ap.add_argument("--bucket-mb", default="25,1,0.25", help="bucket sizes to time, comma-separated")
    ap.add_argument("--batch", type=int, default=64, help="images per rank per step")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.steps < 4:
        ap.error(f"--steps {args.steps}: need >= 4 (4 alternating blocks of steps // 4)")
    torch.set_num_threads(args.threads)
    if args.worker:
        worker(args)
        return {}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__,
           "--worker", f"--steps={args.steps}", f"--bucket-mb={args.bucket_mb}", f"--batch={args.batch}"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=1800,
                         env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
    if out.returncode != 0:
        raise SystemExit(f"torchrun failed:\n{out.stderr[-3000:]}")
    res = json.loads(next(ln for ln in out.stdout.splitlines() if ln.startswith("{")))
    ms, base = res["ms_per_step"], res["ms_per_step"]["per-parameter"]
    print(f"2 gloo processes, resnet18 x0.25, 32 px, batch {args.batch}/rank, AdamW, {args.threads} thread(s) each; "
          f"{res['params']} parameters, {res['grad_mb']:.1f} MB of gradients:")
    per_param = res["block_s"]["per-parameter"]
    for name, t in ms.items():
        blocks = [b / p for b, p in zip(res["block_s"][name], per_param, strict=True)]
        print(f"  {name:16s} {t:8.1f} ms/step   ratio to per-parameter {t / base:.3f}"
              + ("" if name == "per-parameter" else f"   (per block {ratio_summary(blocks, 'blocks')})"))
    return res


if __name__ == "__main__":
    main()
