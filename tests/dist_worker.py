"""Run by torchrun in test_distributed: trains a tiny config and writes this rank's summary."""

import json
import os
import sys

from pst_dist.config import load_config
from pst_dist.train import train

out = sys.argv[1]
summary = train(load_config(None, sys.argv[2:]))
with open(os.path.join(out, f"rank{os.environ['RANK']}.json"), "w") as f:
    json.dump(summary, f)
