#!/usr/bin/env bash
# The Fashion-MNIST science run of issue 2: full 60k training set, 3 seeds x {standard on clean, standard on
# poisoned, PST on poisoned}, then the mean +- std table and curves. Regenerates docs/results/fmnist_science.md:
#   launch/science_fmnist.sh            (JOBS=2 runs in parallel, one thread each; SEEDS=3; OUT=runs/fmnist_science)
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/_jobs.sh
CFG=${CFG:-launch/configs/fmnist_pst.toml}
OUT=${OUT:-runs/fmnist_science}
SEEDS=${SEEDS:-3}
PST=.venv/bin/pst-dist
STD='--schedule.stages=[{name="standard"}]'
for seed in $(seq 0 $((SEEDS - 1))); do
  queue_run "$OUT/clean_standard_seed$seed" --config "$CFG" --train.seed="$seed" --poison.kind=none "$STD"
  queue_run "$OUT/poisoned_standard_seed$seed" --config "$CFG" --train.seed="$seed" "$STD"
  queue_run "$OUT/poisoned_pst_seed$seed" --config "$CFG" --train.seed="$seed"
done
run_queued
mkdir -p docs/results
$PST report "$OUT" --plot docs/results/fmnist_science_curves.png > "$OUT/table.md"
cat "$OUT/table.md"
