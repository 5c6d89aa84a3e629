"""Run by torchrun in test_beton: each rank records the labels (= sample ids) its FFCV loader yields in one epoch."""

import json
import os
import sys

from pst_dist.data.beton import BetonDir
from pst_dist.distributed import init_distributed, teardown

d = init_distributed("cpu")
b = BetonDir(sys.argv[1])
seen = {}
for drop_last in (False, True):
    loader = b.batches("train", 16, shuffle=True, augment="crop_flip", seed=3, drop_last=drop_last,
                          rank=d.rank, world_size=d.world_size, num_workers=1)
    loader.set_epoch(2)
    seen[str(drop_last)] = [int(v) for _, y in loader for v in y]
    seen[f"len_{drop_last}"] = len(loader)
with open(os.path.join(sys.argv[2], f"shard{d.rank}.json"), "w") as f:
    json.dump(seen, f)
teardown()
