"""DeepSpeed engine overhead and 2-process scaling, measured side by side in one run.

  .venv/bin/python bench/engine_overhead.py [--zero-stage 0] [--steps 40] [--threads 1] [--repeats 1]

1. One process: step time of the trainer's ``train_step`` through the DeepSpeed ZeRO-0 engine vs the plain torch
   engine (same model, same initial weights, same batch, same AdamW with one param group per layer group), timed in
   4 alternating blocks so drift hits both; prints the ratio of the totals (target <= 1.1) and the blocks' range.
2. Images/s of the DeepSpeed engine with 2 processes (torchrun, gloo, one thread each) vs 1 process (one thread):
   the data-parallel scaling on this machine's cores. With ``--repeats N`` the two launches alternate N times and
   the median ratio and its range are printed (one pair moves by about 10 % on a 2-core machine).
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
from pst_dist.config import load_config  # noqa: E402
from pst_dist.data.pipeline import Normalize  # noqa: E402
from pst_dist.distributed import DistInfo, init_distributed, teardown  # noqa: E402
from pst_dist.engine import build_engine  # noqa: E402
from pst_dist.models import build_model  # noqa: E402
from pst_dist.pst.freeze import trace_units  # noqa: E402
from pst_dist.pst.groups import layer_groups  # noqa: E402
from pst_dist.pst.schedule import Schedule  # noqa: E402
from pst_dist.report import ratio_summary  # noqa: E402
from pst_dist.train import build_optimizer, train_step  # noqa: E402

MODEL = ["--model.name=resnet18", "--model.width=0.5", "--train.optimizer=adamw", "--train.batch_size=64",
         "--data.img_size=32"]


def setup(cfg, info: DistInfo, model=None):
    model = model or build_model(cfg.model, 10, 3, 32)
    gm = trace_units(model, layer_groups(model, cfg.model.block_groups), torch.zeros(2, 3, 32, 32))
    engine = build_engine(cfg, model, build_optimizer(cfg, model, gm), info)
    stage = Schedule(cfg.schedule.stages, gm.num_groups, 1000, 1000).stage_at(0, ())
    return gm, engine, stage


def run_steps(gm, engine, stage, x, y, n: int) -> float:
    norm = Normalize(torch.zeros(3), torch.ones(3), torch.device("cpu"))
    noauto = lambda: torch.autocast("cpu", enabled=False)
    t = time.perf_counter()
    for _ in range(n):
        train_step(gm, engine, stage, x, y, 1e-3, norm, 10, noauto)
    return time.perf_counter() - t


def batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (64, 3, 32, 32), generator=g, dtype=torch.uint8), torch.randint(0, 10, (64,),
                                                                                                 generator=g)


def overhead(args) -> tuple[float, float, list[float]]:
    """ms/step of the plain and the DeepSpeed engine over all blocks, and each block's ratio DeepSpeed / plain."""
    info = init_distributed("cpu", single_process_group=True)  # DeepSpeed's group; teardown puts the environment back
    plain_cfg = load_config(None, MODEL)
    ds_cfg = load_config(None, [*MODEL, "--deepspeed.enabled=true", f"--deepspeed.zero_stage={args.zero_stage}"])
    torch.manual_seed(0)
    model = build_model(plain_cfg.model, 10, 3, 32)
    a = setup(plain_cfg, info, model)
    b = setup(ds_cfg, info, copy.deepcopy(model))
    x, y = batch(0)
    run_steps(*a, x, y, 5), run_steps(*b, x, y, 5)  # warm-up
    block = max(1, args.steps // 4)
    pairs = [(run_steps(*a, x, y, block), run_steps(*b, x, y, block)) for _ in range(4)]
    teardown()
    n = 4 * block
    t_plain, t_ds = (sum(p[i] for p in pairs) for i in (0, 1))
    return 1000 * t_plain / n, 1000 * t_ds / n, [ds / plain for plain, ds in pairs]


def worker(args) -> None:
    """Under torchrun: images/s of the DeepSpeed engine on this rank's batches; rank 0 prints the total."""
    info = init_distributed("cpu")
    cfg = load_config(None, [*MODEL, "--deepspeed.enabled=true", f"--deepspeed.zero_stage={args.zero_stage}"])
    torch.manual_seed(0)
    gm, engine, stage = setup(cfg, info)
    x, y = batch(info.rank)
    run_steps(gm, engine, stage, x, y, 5)
    dt = run_steps(gm, engine, stage, x, y, args.steps)
    if info.is_primary:
        print(json.dumps({"images_per_s": 64 * args.steps * info.world_size / dt}), flush=True)
    teardown()
    sys.stdout.flush()
    os._exit(0)


def scaled(nproc: int, args) -> float:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), __file__,
           "--worker", f"--zero-stage={args.zero_stage}", f"--steps={args.steps}"]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    if out.returncode != 0:
        raise SystemExit(f"torchrun --nproc_per_node {nproc} failed:\n{out.stderr[-3000:]}")
    line = next(ln for ln in out.stdout.splitlines() if ln.startswith("{"))
    return json.loads(line)["images_per_s"]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--zero-stage", type=int, default=0)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    ap.add_argument("--repeats", type=int, default=1,
                    help="launch 1 and 2 processes this many times, alternating: the scaling ratio's median and range")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.repeats < 1:
        ap.error(f"--repeats {args.repeats}: need >= 1")
    if args.steps < 4:
        ap.error(f"--steps {args.steps}: need >= 4 (4 alternating blocks of steps // 4)")
    torch.set_num_threads(args.threads)
    if args.worker:
        worker(args)
        return {}
    plain, ds, blocks = overhead(args)
    print(f"one process, resnet18 x0.5, 32 px, batch 64, AdamW, {args.threads} thread(s):")
    print(f"  plain torch engine     {plain:8.1f} ms/step")
    print(f"  DeepSpeed ZeRO-{args.zero_stage} engine {ds:8.1f} ms/step")
    print(f"  ratio DeepSpeed / plain : {ds / plain:.3f}   (target <= 1.1; "
          f"per block {ratio_summary(blocks, 'blocks')})", flush=True)
    launches = [(scaled(1, args), scaled(2, args)) for _ in range(args.repeats)]
    for one, two in launches:
        print(f"DeepSpeed ZeRO-{args.zero_stage} images/s: 1 process {one:.0f}, 2 processes {two:.0f}", flush=True)
    scaling = [two / one for one, two in launches]
    print(f"  ratio 2 processes / 1 process : {ratio_summary(scaling)}   ({args.threads} thread(s) per process)")
    return {"plain_ms": plain, "deepspeed_ms": ds, "deepspeed_vs_plain": ds / plain, "block_ratios": blocks,
            "images_per_s": launches, "scaling": scaling}


if __name__ == "__main__":
    main()
