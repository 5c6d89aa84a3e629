#!/usr/bin/env bash
# Same PST run, same seeds, on the two data paths: the torch in-memory path over Fashion-MNIST, and the FFCV
# Loader over a raw .beton written from the same recipe (same split, same poison). Regenerates
# docs/results/beton_equivalence.md:   launch/beton_equivalence.sh   (SEEDS=2, JOBS=2, OUT=runs/beton_equivalence)
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/_jobs.sh
CFG=${CFG:-launch/configs/demo.toml}
OUT=${OUT:-runs/beton_equivalence}
SEEDS=${SEEDS:-2}
PST=.venv/bin/pst-dist
mkdir -p "$OUT"
[ -f "$OUT/beton/beton.json" ] || $PST write-beton --config "$CFG" --out "$OUT/beton"
for seed in $(seq 0 $((SEEDS - 1))); do
  queue_run "$OUT/torch_seed$seed" --config "$CFG" --train.seed="$seed"
  queue_run "$OUT/ffcv_seed$seed" --config "$CFG" --train.seed="$seed" --data.source=beton --data.root="$OUT/beton" \
    --poison.kind=none --data.loader_workers=1
done
run_queued
$PST report "$OUT" > "$OUT/table.md"
cat "$OUT/table.md"
