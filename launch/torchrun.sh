#!/usr/bin/env bash
# Data-parallel PST training on one node: NPROC processes (GPUs when present, else CPU with gloo).
#   NPROC=2 launch/torchrun.sh --config launch/configs/fmnist_pst.toml [--section.key=value ...]
set -euo pipefail
# Runs where it is called: relative paths (--config, and run_dir / data.root in it or in the arguments) are the
# caller's, as with pst-dist train.
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PY:-$ROOT/.venv/bin/python}
export PYTHONSAFEPATH=1  # `python -m` imports this repository's pst_dist, never one in the working directory
exec "$PY" -m torch.distributed.run --standalone --nproc_per_node "${NPROC:-2}" -m pst_dist.cli train "$@"
