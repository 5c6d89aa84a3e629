# Sourced by the result scripts: queue `pst-dist train` runs, then run them JOBS at a time, one thread each.
#   queue_run RUN_DIR [train args...]   skips a run whose summary.json exists; otherwise --resume=auto starts it,
#                                       resumes one cut short, or starts one cut short before its first checkpoint
#                                       again (its own files only); logs to RUN_DIR.log
#   run_queued                          runs the queue with JOBS (default 2) in parallel
JOBS=${JOBS:-2}
_queue=$(mktemp)
trap 'rm -f "$_queue"' EXIT

queue_run() {
  local run=$1
  shift
  [ -f "$run/summary.json" ] && return 0
  mkdir -p "$(dirname "$run")"
  printf '%q ' .venv/bin/pst-dist train "$@" --train.threads=1 --log.progress=false --log.run_dir="$run" \
    --resume=auto >> "$_queue"
  printf '> %q 2>&1\n' "$run.log" >> "$_queue"
}

run_queued() {
  xargs -d '\n' -P "$JOBS" -I{} bash -c '{}' < "$_queue"
  : > "$_queue"
}

# pst_candidate OUT CONFIG [bench args...]: the recipe's PST column, seed 0, one cell per attack, on the bench's
# cached seed-0 poisons (runs/bench_fmnist/poisons, linked into OUT/poisons; missing ones are made there); prints
# the cells' lines. Used to screen PST settings on validation accuracy.
pst_candidate() {
  local out=$1 config=$2
  shift 2
  mkdir -p "$out/poisons"
  for p in runs/bench_fmnist/poisons/*_seed0; do
    [ -d "$p" ] && [ ! -e "$out/poisons/$(basename "$p")" ] && ln -s "$(realpath "$p")" "$out/poisons/"
  done
  # the bench's exit status is the candidate's (a failed cell must not leave a candidate judged on fewer attacks)
  (set -o pipefail; .venv/bin/pst-dist bench --config "$config" --bench.defenses='["pst"]' --bench.seeds=1 \
    --bench.jobs=2 --bench.out="$out" "$@" 2>&1 | { grep -a -E "\[bench\] (cell|FAILED)|error" || true; })
}
