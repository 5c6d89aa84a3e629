"""Entry point for ``ray submit cluster/<x>.yaml tune/run.py -- --config ...`` and ``ray job submit -- python
tune/run.py --config ...``: the same as ``pst-dist tune``, on the running Ray cluster. ``ray job submit`` names it
in RAY_ADDRESS; ``ray submit`` runs this script on the head node without it, so the cluster ``ray start`` started
there is joined (its address file, where ``ray status`` finds it). With neither, it is refused: ``pst-dist tune``
searches on a local Ray of its own."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, when run as a script

from pst_dist.cli import cluster_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(cluster_main("tune", "tune/run.py", sys.argv[1:]))
