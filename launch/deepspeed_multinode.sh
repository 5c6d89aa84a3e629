#!/usr/bin/env bash
# Several nodes through the DeepSpeed launcher and a hostfile ("node1 slots=8" per line); run on the first node,
# which must reach the others by passwordless ssh, each with this repository at the same path and `make` done.
# The DeepSpeed launcher starts the other nodes through pdsh (`apt-get install pdsh` on the first node).
#   HOSTFILE=hosts launch/deepspeed_multinode.sh --config launch/configs/vit_large_imagenet_mini.toml
set -euo pipefail
: "${HOSTFILE:?set HOSTFILE to a DeepSpeed hostfile (lines: <host> slots=<gpus>)}"
[ -f "$HOSTFILE" ] || { echo "hostfile not found: $HOSTFILE" >&2; exit 2; }
HOSTFILE=$(realpath "$HOSTFILE")  # as given, from the caller's directory (before the cd below)
hosts=$(grep -cE '^[[:space:]]*[^#[:space:]]' "$HOSTFILE" || true)
if [ "$hosts" -gt 1 ] && ! command -v pdsh >/dev/null; then
  echo "pdsh not found: the DeepSpeed launcher starts the other $((hosts - 1)) node(s) with it (apt-get install pdsh)" >&2
  exit 2
fi
cd "$(dirname "$0")/.."  # the launcher runs every node from this path: relative paths resolve against the repository
BIN=${BIN:-.venv/bin}
exec "$BIN/deepspeed" --hostfile "$HOSTFILE" --master_port "${MASTER_PORT:-29500}" --no_local_rank --module pst_dist.cli train "$@"
