"""Entry point for ``ray submit cluster/<x>.yaml launch/bench_ray.py -- --config ...`` and ``ray job submit --
python launch/bench_ray.py --config ...``: ``pst-dist bench`` with ``bench.runner = "ray"``, its cells Ray tasks on
the running cluster (``bench.out`` and the data on storage every node mounts at the same path). ``ray job submit``
names the cluster in RAY_ADDRESS; ``ray submit`` runs this script on the head node without it, so the cluster ``ray
start`` started there is joined, as tune/run.py does. With neither, it is refused: ``pst-dist bench`` runs on this
machine (its process pool, or a local Ray of its own)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, when run as a script

from pst_dist.cli import cluster_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(cluster_main("bench", "launch/bench_ray.py", sys.argv[1:], last=("--bench.runner=ray",)))
