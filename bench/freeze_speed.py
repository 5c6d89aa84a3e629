"""Step time with the shallow half of the layer groups frozen vs all groups trainable, through the trainer's own
``train_step`` (schedule stages, per-group param groups, no-grad prefix). Same model, same batch, one run,
interleaved A/B measurements; prints the median ratio.

    .venv/bin/python bench/freeze_speed.py [--model resnet18] [--batch 64] [--steps 8] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from pst_dist.config import Config, ModelConfig, StageConfig
from pst_dist.data.pipeline import Normalize
from pst_dist.models import build_model
from pst_dist.pst.freeze import trace_units
from pst_dist.pst.groups import layer_groups
from pst_dist.pst.schedule import Schedule
from pst_dist.report import ratio_summary
from pst_dist.train import build_optimizer, train_step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--width", type=float, default=1.0)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=8, help="timed steps per setting (after 2 warm-up steps)")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build_model(ModelConfig(name=args.model, width=args.width), 10, 3, args.size)
    gm = trace_units(model, layer_groups(model), torch.zeros(2, 3, args.size, args.size))
    k = gm.num_groups
    shallow = list(range(k // 2))
    stages = [StageConfig(name="all", steps=1), StageConfig(name="shallow_frozen", freeze=shallow)]
    sched = Schedule(stages, k, steps_per_epoch=1, total_steps=2)
    full, frozen = sched.stage_at(0), sched.stage_at(1)

    opt = build_optimizer(Config(), model, gm)  # the trainer's default: SGD, lr 0.1, one param group per layer group
    x = torch.randint(0, 256, (args.batch, 3, args.size, args.size), dtype=torch.uint8)
    y = torch.randint(0, 10, (args.batch,))
    norm = Normalize(torch.full((3,), 0.5), torch.full((3,), 0.25), torch.device("cpu"))
    noauto = lambda: torch.autocast("cpu", enabled=False)
    model.train()

    def timed(stage) -> float:
        model.train()
        gm.fix_frozen_bn(stage.mults)  # as the trainer does on entering a stage (freeze_bn_stats = true)
        t = time.perf_counter()
        train_step(gm, opt, stage, x, y, 0.01, norm, 10, noauto)
        return time.perf_counter() - t

    for st in (full, frozen, full, frozen):  # warm-up
        timed(st)
    t_full, t_frozen = [], []
    for _ in range(args.steps):
        t_full.append(timed(full))
        t_frozen.append(timed(frozen))
    mf, mz = statistics.median(t_full), statistics.median(t_frozen)
    names = [g.name for g in gm.groups]
    print(f"model {args.model} width {args.width} batch {args.batch} {args.size}px, {k} groups {names}")
    print(f"frozen (no-grad prefix): {[names[i] for i in shallow]}; threads {torch.get_num_threads()}")
    print(f"step time all trainable : {1000 * mf:8.1f} ms (median of {args.steps})")
    print(f"step time shallow frozen: {1000 * mz:8.1f} ms (median of {args.steps})")
    pairs = ratio_summary([z / f for f, z in zip(t_full, t_frozen, strict=True)], "pairs")
    print(f"ratio frozen / full     : {mz / mf:.3f}   (per pair {pairs})")


if __name__ == "__main__":
    main()
