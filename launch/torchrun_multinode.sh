#!/usr/bin/env bash
# Several nodes with torchrun (rendezvous on the first node): run this on every node.
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 launch/torchrun_multinode.sh --config X.toml [--k=v ...]
set -euo pipefail
cd "$(dirname "$0")/.."  # every node runs from its copy of the repository: relative paths resolve against it
PY=${PY:-.venv/bin/python}
: "${NNODES:?}" "${NODE_RANK:?}" "${MASTER_ADDR:?}"
NPROC=${NPROC:-$("$PY" -c "import torch; print(max(torch.cuda.device_count(), 1))")}
exec "$PY" -m torch.distributed.run --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "$NPROC" \
  --master_addr "$MASTER_ADDR" --master_port "${MASTER_PORT:-29500}" -m pst_dist.cli train "$@"
