#!/usr/bin/env bash
# One node, all local accelerators, through the DeepSpeed launcher (set deepspeed.enabled = true in the recipe).
#   launch/deepspeed.sh --config launch/configs/vit_large_imagenet_mini.toml [--section.key=value ...]
#   NGPU=4 launch/deepspeed.sh ...        (default: every visible GPU; on a CPU machine NGPU=2 runs 2 CPU ranks)
set -euo pipefail
# Runs where it is called: relative paths (--config, and run_dir / data.root in it or in the arguments) are the
# caller's, as with pst-dist train.
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=${BIN:-$ROOT/.venv/bin}
export PYTHONSAFEPATH=1  # `python -m` imports this repository's pst_dist, never one in the working directory
if [ -z "${NGPU:-}" ]; then NGPU=$("$BIN/python" -c "import torch; print(max(torch.cuda.device_count(), 1))"); fi
exec "$BIN/deepspeed" --num_accelerators "$NGPU" --no_local_rank --module pst_dist.cli train "$@"
