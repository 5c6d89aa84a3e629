"""One rank of the 2-process EM test: generate a sample-wise EM poison under a gloo process group."""

import sys
from pathlib import Path

import torch

from pst_dist.distributed import init_distributed, teardown
from tests.test_attacks import gen, tiny

out = Path(sys.argv[1])
torch.set_num_threads(1)
info = init_distributed("cpu")
x, y, cfg = tiny("em", 3)
p, what = gen(x, y, cfg)
torch.save({"poisoned": p, "clean": x, "info": dict(what, seconds=0)}, out / f"rank{info.rank}.pt")
teardown()
