#!/usr/bin/env bash
# Choose the bench's PST view and release-stage loss on *validation* accuracy: the bench's PST column, seed 0 only,
# once per candidate, on the same poisons as docs/results/bench_fmnist.md (linked from runs/bench_fmnist/poisons
# when they exist, else made here). Prints each candidate's final-epoch validation accuracy per attack; the pick is
# the best worst case over attacks. Test accuracy plays no part (the bench's log prints it; it is not read here).
#   step 1: the perturbation-suppressing view of the warm-up trigger and of every stage's loss (a view without its
#           own strength, e.g. `quantize`, at the demo's strength 3 in the loss and 1 in the trigger);
#   step 2: with the chosen view, the release stage's loss with a consistency term (raw vs view) or without.
# launch/configs/bench_fmnist.toml holds the result (randblur:2+quantize:3, consistency 1 in the release stage).
# Usage: launch/select_pst_view.sh        (about 4 minutes per candidate on 2 cores; finished candidates are skipped)
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=launch/configs/bench_fmnist.toml
source launch/_jobs.sh
candidate() {  # name, overrides...
  local name=$1
  shift
  pst_candidate "runs/pst_view_select/$name" "$CONFIG" "$@"
}
NAMES=()
for v in quantize randblur:2 randblur:3 randblur:2+quantize:3 randblur:2.5+quantize:3 quantize:3+randblur:2; do
  NAMES+=("${v//[:+]/_}")
  candidate "${v//[:+]/_}" --schedule.stages.0.trigger.view="$v" --schedule.stages.{0,1,2}.loss.view="$v" \
    --schedule.stages.{0,1,2}.loss.view_strength=3.0 --schedule.stages.2.loss.consistency=0.0
done
NAMES+=(randblur_2_quantize_3_consistency)
candidate randblur_2_quantize_3_consistency --schedule.stages.0.trigger.view=randblur:2+quantize:3 \
  --schedule.stages.{0,1,2}.loss.view=randblur:2+quantize:3 --schedule.stages.2.loss.consistency=1.0
.venv/bin/python - "${NAMES[@]}" <<'PY'
import csv, statistics, sys
rows = {n: {r["attack"]: 100 * float(r["final_val_acc"])
            for r in csv.DictReader(open(f"runs/pst_view_select/{n}/results.csv"))} for n in sys.argv[1:]}
attacks = list(next(iter(rows.values())))
if uneven := {n: sorted(set(attacks) ^ set(r)) for n, r in rows.items() if set(r) != set(attacks)}:
    sys.exit(f"select_pst_view: the candidates do not hold the same attacks ({uneven}): each is judged on its worst")
print("| candidate | " + " | ".join(attacks) + " | min | mean |")
print("|---|" + "---:|" * (len(attacks) + 2))
for n, r in rows.items():
    xs = [r[a] for a in attacks]
    print(f"| `{n}` | " + " | ".join(f"{x:.1f}" for x in xs) + f" | {min(xs):.1f} | {statistics.mean(xs):.1f} |")
views = [n for n in rows if not n.endswith("_consistency")]
pick = lambda names: max(names, key=lambda n: min(rows[n].values()))
print(f"\nstep 1 pick (best worst-case final validation accuracy): {pick(views)}")
print(f"step 2 pick: {pick([pick(views), *[n for n in rows if n.endswith('_consistency')]])}")
PY
