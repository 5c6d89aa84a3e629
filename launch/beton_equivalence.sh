#!/usr/bin/env bash
# Same PST run, same seeds, on the two data paths: the torch in-memory path over Fashion-MNIST, and the FFCV
# Loader over a raw .beton written from the same recipe (same split, same poison). Regenerates
# docs/results/beton_equivalence.md:   launch/beton_equivalence.sh   (SEEDS=2, JOBS=2, OUT=runs/beton_equivalence)
set -euo pipefail
cd "$(dirname "$0")/.."
CFG=${CFG:-launch/configs/demo.toml}
OUT=${OUT:-runs/beton_equivalence}
SEEDS=${SEEDS:-2}
JOBS=${JOBS:-2}
PST=.venv/bin/pst-dist
mkdir -p "$OUT"
[ -f "$OUT/beton/beton.json" ] || $PST write-beton --config "$CFG" --out "$OUT/beton"
jobs_file=$(mktemp)
for seed in $(seq 0 $((SEEDS - 1))); do
  for path in torch ffcv; do
    run="$OUT/${path}_seed${seed}"
    [ -f "$run/summary.json" ] && continue
    extra=()
    [ "$path" = ffcv ] && extra=(--data.source=beton --data.root="$OUT/beton" --poison.kind=none --data.loader_workers=1)
    printf '%q ' "$PST" train --config "$CFG" --train.seed="$seed" --train.threads=1 --log.progress=false \
      --log.run_dir="$run" "${extra[@]}" >> "$jobs_file"
    printf '> %q 2>&1\n' "$run.log" >> "$jobs_file"
  done
done
xargs -d '\n' -P "$JOBS" -I{} bash -c '{}' < "$jobs_file"
rm -f "$jobs_file"
$PST report "$OUT" > "$OUT/table.md"
cat "$OUT/table.md"
