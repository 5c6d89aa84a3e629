"""Run by torchrun in test_deepspeed: trains a tiny config through the DeepSpeed engine and records, per epoch, a
hash of each layer group's parameters (full parameters, gathered under ZeRO-3) and the training loss."""

import hashlib
import json
import os
import signal
import sys

from pst_dist.config import load_config
from pst_dist.data.loaders import TensorBatches
from pst_dist.data.pipeline import build_data
from pst_dist.train import train

out, rest = sys.argv[1], sys.argv[2:]
resume = "--resume" in rest
kill_at = next((a.split("=")[1] for a in rest if a.startswith("--kill-at=")), None)  # "epoch,batch"
rest = [a for a in rest if a != "--resume" and not a.startswith("--kill-at=")]
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


def on_epoch(epoch, logs, gm, engine):
    params = dict(gm.model.named_parameters())
    with engine.gathered():
        hashes = []
        for g in gm.groups:
            h = hashlib.sha256()
            for n in g.param_names:
                h.update(params[n].detach().float().cpu().numpy().tobytes())
            hashes.append(h.hexdigest())
    records.append({"epoch": epoch, "loss": logs["train/loss"], "groups": hashes})


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
