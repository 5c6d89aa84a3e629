#!/usr/bin/env bash
# The Fashion-MNIST science run of issue 2: full 60k training set, 3 seeds x {standard on clean, standard on
# poisoned, PST on poisoned}, then the mean +- std table and curves. Regenerates docs/results/fmnist_science.md:
#   launch/science_fmnist.sh            (JOBS=2 runs in parallel, one thread each; SEEDS=3; OUT=runs/fmnist_science)
set -euo pipefail
cd "$(dirname "$0")/.."
CFG=${CFG:-launch/configs/fmnist_pst.toml}
OUT=${OUT:-runs/fmnist_science}
SEEDS=${SEEDS:-3}
JOBS=${JOBS:-2}
PST=.venv/bin/pst-dist
STD='--schedule.stages=[{name="standard"}]'
jobs_file=$(mktemp)
for seed in $(seq 0 $((SEEDS - 1))); do
  for cond in clean_standard poisoned_standard poisoned_pst; do
    case $cond in
      clean_standard) extra=(--poison.kind=none "$STD") ;;
      poisoned_standard) extra=("$STD") ;;
      poisoned_pst) extra=() ;;
    esac
    run="$OUT/${cond}_seed${seed}"
    [ -f "$run/summary.json" ] && continue
    printf '%q ' "$PST" train --config "$CFG" --train.seed="$seed" --train.threads=1 --log.progress=false \
      --log.run_dir="$run" "${extra[@]}" >> "$jobs_file"
    printf '> %q 2>&1\n' "$run.log" >> "$jobs_file"
  done
done
mkdir -p "$OUT"
xargs -d '\n' -P "$JOBS" -I{} bash -c '{}' < "$jobs_file"
rm -f "$jobs_file"
mkdir -p docs/results
$PST report "$OUT" --plot docs/results/fmnist_science_curves.png > "$OUT/table.md"
cat "$OUT/table.md"
