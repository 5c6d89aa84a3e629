#!/usr/bin/env bash
# Choose the PST schedule's perturbation-suppressing view on *validation* accuracy: the bench's PST column, seed 0
# only, once per candidate view (used by the warm-up trigger and by every stage's loss), on the same poisons as
# docs/results/bench_fmnist.md (linked from runs/bench_fmnist/poisons when they exist, else made here). Prints each
# candidate's final-epoch validation accuracy per attack; the pick is the best worst case over attacks. Test accuracy
# is not read. Usage: [VIEWS="v1 v2"] launch/select_pst_view.sh
set -euo pipefail
cd "$(dirname "$0")/.."
VIEWS="${VIEWS:-quantize randblur:2 randblur:3 randblur:2+quantize:3 randblur:2.5+quantize:3 quantize:3+randblur:2}"
CONFIG=launch/configs/bench_fmnist.toml
for v in $VIEWS; do
  out="runs/pst_view_select/${v//[:+]/_}"
  mkdir -p "$out/poisons"
  for p in runs/bench_fmnist/poisons/*_seed0; do
    [ -d "$p" ] && [ ! -e "$out/poisons/$(basename "$p")" ] && ln -s "$(realpath "$p")" "$out/poisons/"
  done
  .venv/bin/pst-dist bench --config "$CONFIG" --bench.defenses='["pst"]' --bench.seeds=1 --bench.jobs=2 \
    --bench.out="$out" "--schedule.stages.0.trigger.view=\"$v\"" "--schedule.stages.0.loss.view=\"$v\"" \
    "--schedule.stages.1.loss.view=\"$v\"" "--schedule.stages.2.loss.view=\"$v\"" 2>&1 | grep -a "\[bench\] cell" || true
done
.venv/bin/python - $VIEWS <<'PY'
import csv, statistics, sys
rows = {}
for v in sys.argv[1:]:
    path = f"runs/pst_view_select/{v.replace(':', '_').replace('+', '_')}/results.csv"
    rows[v] = {r["attack"]: 100 * float(r["final_val_acc"]) for r in csv.DictReader(open(path))}
attacks = list(next(iter(rows.values())))
print("| PST view | " + " | ".join(attacks) + " | min | mean |")
print("|---|" + "---:|" * (len(attacks) + 2))
for v, r in rows.items():
    xs = [r[a] for a in attacks]
    print(f"| `{v}` | " + " | ".join(f"{x:.1f}" for x in xs) + f" | {min(xs):.1f} | {statistics.mean(xs):.1f} |")
best = max(rows, key=lambda v: min(rows[v].values()))
print(f"\npick (best worst-case final validation accuracy): {best}")
PY
