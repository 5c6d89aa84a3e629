"""One rank of the 2-process EM test: generate a sample-wise EM poison under a gloo process group."""

import sys
from pathlib import Path

import torch

from pst_dist.distributed import init_distributed, teardown
from pst_dist.poison import model_based
from tests.test_attacks import gen, tiny

out = Path(sys.argv[1])
torch.set_num_threads(1)
info = init_distributed("cpu")
x, y, cfg = tiny("em", 3)
surrogates, initial = [], []  # the surrogate each rank trains: the same weights on both when gradients are shared
build = model_based.build_model


def recorded(*args, **kwargs):
    model = build(*args, **kwargs)
    surrogates.append(model)
    initial.append({k: v.clone() for k, v in model.state_dict().items()})
    return model


model_based.build_model = recorded
p, what = gen(x, y, cfg)
torch.save({"poisoned": p, "clean": x, "info": dict(what, seconds=0), "initial": initial[0],
            "surrogate": [m.state_dict() for m in surrogates]}, out / f"rank{info.rank}.pt")
teardown()
