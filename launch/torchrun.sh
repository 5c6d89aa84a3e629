#!/usr/bin/env bash
# Data-parallel PST training on one node: NPROC processes (GPUs when present, else CPU with gloo).
#   NPROC=2 launch/torchrun.sh --config launch/configs/fmnist_pst.toml [--section.key=value ...]
set -euo pipefail
# Runs where it is called: relative paths in the arguments (--config, --log.run_dir, --data.root) are the caller's.
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PY:-$ROOT/.venv/bin/python}
exec "$PY" -m torch.distributed.run --standalone --nproc_per_node "${NPROC:-2}" -m pst_dist.cli train "$@"
