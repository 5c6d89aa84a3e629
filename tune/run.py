"""Entry point for ``ray submit cluster/<x>.yaml tune/run.py -- --config ...`` and ``ray job submit -- python
tune/run.py --config ...``: the same as ``pst-dist tune``. Attaches to the cluster that RAY_ADDRESS names."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, when run as a script

from pst_dist.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["tune", *sys.argv[1:]]))
