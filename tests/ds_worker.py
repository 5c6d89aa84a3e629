"""Run by torchrun in test_deepspeed: trains a tiny config through the DeepSpeed engine and records, per epoch, a
hash of each layer group's parameters (full parameters, gathered under ZeRO-3) and the training loss; with
--record-steps also what the torch optimizer that steps saw, per layer group (see StepRecorder)."""

import hashlib
import json
import os
import signal
import sys

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from pst_dist.config import load_config
from pst_dist.data.loaders import TensorBatches
from pst_dist.data.pipeline import build_data
from pst_dist.train import train

out, rest = sys.argv[1], sys.argv[2:]
resume = "--resume" in rest
kill_at = next((a.split("=")[1] for a in rest if a.startswith("--kill-at=")), None)  # "epoch,batch"
record_steps = "--record-steps" in rest
rest = [a for a in rest if a not in ("--resume", "--record-steps") and not a.startswith("--kill-at=")]
rank = int(os.environ["RANK"])
records = []


class KillingBatches(TensorBatches):
    """The trainer's own loader, except that at (epoch, batch) it SIGKILLs the whole job (torchrun and both ranks
    share the process group the test started): a kill -9 in the middle of an epoch."""

    def __iter__(self):
        ke, kb = (int(v) for v in kill_at.split(","))
        for b, batch in enumerate(super().__iter__()):
            if self.epoch == ke and b == kb:
                os.killpg(os.getpgid(0), signal.SIGKILL)
            yield batch


class StepRecorder:
    """A global torch optimizer step pre-hook: for each param group the torch optimizer is about to step (DeepSpeed's
    ZeRO optimizers step it with the fp32 master partitions in the groups), per layer group over the epoch: the lrs
    and weight decays it saw, whether its gradient was all zero at every step, and the devices of its parameters,
    gradients and optimizer state."""

    def __init__(self):
        self.groups: dict[int, dict] = {}
        register_optimizer_step_pre_hook(self)

    def __call__(self, optimizer, args, kwargs):
        for pg in optimizer.param_groups:
            if "layer_group" not in pg or not pg["params"]:
                continue
            r = self.groups.setdefault(pg["layer_group"], {"lr": set(), "wd": set(), "zero_grad": True,
                                                           "devices": set()})
            r["lr"].add(pg["lr"])
            r["wd"].add(pg["weight_decay"])
            for p in pg["params"]:
                r["zero_grad"] &= p.grad is not None and not p.grad.any()
                tensors = [p, p.grad, *(v for v in optimizer.state.get(p, {}).values() if torch.is_tensor(v))]
                r["devices"] |= {t.device.type for t in tensors if t is not None and t.dim() > 0}

    def pop(self) -> dict:
        out = {str(g): {k: sorted(v) if isinstance(v, set) else v for k, v in r.items()}
               for g, r in sorted(self.groups.items())}
        self.groups = {}
        return out


recorder = StepRecorder() if record_steps else None


def on_epoch(epoch, logs, gm, engine):
    params = dict(gm.model.named_parameters())
    with engine.gathered():
        hashes = []
        for g in gm.groups:
            h = hashlib.sha256()
            for n in g.param_names:
                h.update(params[n].detach().float().cpu().numpy().tobytes())
            hashes.append(h.hexdigest())
    ds = getattr(engine, "engine", None)  # DeepSpeed's own engine, when the DeepSpeed engine trains
    records.append({"epoch": epoch, "loss": logs["train/loss"], "groups": hashes, "engine": type(engine).__name__,
                    "zero_stage": ds.zero_optimization_stage() if ds is not None else None,
                    "bf16": ds.bfloat16_enabled() if ds is not None else None,
                    "dtype": str(next(gm.model.parameters()).dtype)})
    if recorder is not None:
        records[-1]["steps"] = recorder.pop()
        opt = engine.optimizer  # the ZeRO optimizer: where DeepSpeed put the fp32 master partitions
        records[-1]["offload"] = bool(getattr(opt, "cpu_offload", False) or getattr(opt, "offload_optimizer", False))
        records[-1]["param_offload"] = bool(getattr(opt, "offload_param", False))


cfg = load_config(None, rest)
data = loader = None
if kill_at:
    data = build_data(cfg)
    loader = KillingBatches(data.poisoned_train, data.splits.train.labels, cfg.train.batch_size, shuffle=True,
                            augment=cfg.data.augment, seed=cfg.train.seed, drop_last=True, rank=rank,
                            world_size=int(os.environ["WORLD_SIZE"]))
summary = train(cfg, resume=resume, data=data, loader=loader, on_epoch=on_epoch)
with open(os.path.join(out, f"rank{rank}{'_resumed' if resume else ''}.json"), "w") as f:
    json.dump({"summary": summary, "records": records}, f)
sys.stdout.flush()
os._exit(0)  # the process group is destroyed; skip interpreter teardown (see cli.cmd_train)
