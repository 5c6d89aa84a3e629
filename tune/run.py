"""Entry point for ``ray submit cluster/<x>.yaml tune/run.py -- --config ...`` and ``ray job submit -- python
tune/run.py --config ...``: the same as ``pst-dist tune``, on the running Ray cluster. ``ray job submit`` names it
in RAY_ADDRESS; ``ray submit`` runs this script on the head node without it, so the cluster ``ray start`` started
there is joined (its address file, where ``ray status`` finds it). With neither, it is refused: ``pst-dist tune``
searches on a local Ray of its own."""

import os
import socket
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, when run as a script

from pst_dist.cli import main  # noqa: E402


def join_the_cluster_here() -> str | None:
    """Set RAY_ADDRESS to the cluster ``ray start`` started on this node when it is unset (``ray submit``); returns
    the message to print, or None when RAY_ADDRESS was set. Raises SystemExit(2) when no cluster runs here: a
    private Ray would run the whole search on this one node (and find no GPU on a head without one)."""
    if os.environ.get("RAY_ADDRESS"):
        return None
    # where `ray start` records it (under RAY_TMPDIR, else TMPDIR, else /tmp: ray/ray_current_cluster); private, as
    # ray 2.60.0 (pinned) has them
    from ray._common.utils import get_ray_address_file  # optional heavy dependency (Ray), only on this path
    from ray._private.utils import read_ray_address  # optional heavy dependency (Ray), only on this path

    address = read_ray_address()
    if not address:
        print(f"error: tune/run.py searches on a running Ray cluster: RAY_ADDRESS is unset and no `ray start` ran on "
              f"this machine ({get_ray_address_file(None)} not found; a head started with --temp-dir=DIR records "
              f"DIR/ray_current_cluster instead: set RAY_ADDRESS=<head>:<port>); use `ray submit` / `ray job "
              f"submit` onto a cluster, or `pst-dist tune` for a search on a local Ray of its own", file=sys.stderr)
        raise SystemExit(2)
    host, _, port = address.rpartition(":")
    try:  # a cluster stopped without `ray stop` (a crash) leaves its file: say so, not a ConnectionError later
        socket.create_connection((host, int(port)), timeout=5).close()
    except (OSError, ValueError):
        print(f"error: the Ray cluster recorded on this machine, at {address} (ray_current_cluster in Ray's temp "
              f"dir), does not answer: stopped without `ray stop`? Start it again (`ray start --head`, or `ray up`) "
              f"or set RAY_ADDRESS", file=sys.stderr)
        raise SystemExit(2) from None
    os.environ["RAY_ADDRESS"] = address
    return f"[tune] RAY_ADDRESS unset (ray submit): joining the Ray cluster started on this node, at {address}"


if __name__ == "__main__":
    if "-h" not in sys.argv[1:] and "--help" not in sys.argv[1:]:
        if joined := join_the_cluster_here():
            print(joined, file=sys.stderr)
    sys.exit(main(["tune", *sys.argv[1:]]))
