#!/usr/bin/env bash
# Screen changes to a PST recipe on *validation* accuracy before a `pst-dist tune` search over the survivors: the
# recipe's PST cell, seed 0 only, once per candidate, on the bench's cached poisons (runs/bench_fmnist/poisons, linked;
# missing ones are made). TAP is never run here (held out); the test split is not read. Prints each candidate's final
# validation accuracy per attack and the worst case.
# Usage: launch/explore_one_recipe.sh [ROUND [ATTACKS_JSON]]
#   (default: round 3; attacks: clean + the 3 attacks PST did worst on)
#   round 2: changes to the first search's recipe (launch/configs/fmnist_one_recipe_first.toml),
#            out runs/one_recipe_explore
#   round 3: changes to the second search's recipe (launch/configs/fmnist_one_recipe_second.toml),
#            out runs/one_recipe_explore3
# Each candidate: ~4 min on 2 cores; finished candidates are skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUND=${1:-3}
ATTACKS=${2:-'["none","conv_blur","lsp","em"]'}
source launch/_jobs.sh
candidate() {  # name, overrides...
  local name=$1
  shift
  echo "== $name: $*"
  pst_candidate "$OUT/$name" "$CONFIG" --bench.attacks="$ATTACKS" "$@"
}
# stages: 0 warm, 1 frozen (groups 0, 1), 2 release_1 (group 1 back), 3 release_0 (group 0 back; the rest of the run)
W='--schedule.stages.1' R='--schedule.stages.2.loss' S='--schedule.stages.3.loss' T='--schedule.stages.3'
case $ROUND in
2)
  CONFIG=launch/configs/fmnist_one_recipe_first.toml OUT=runs/one_recipe_explore
  NAMES=(base release_ce0.5 release_ce1 release_view_randblur2 release_view_q2)
  candidate base
  candidate release_ce0.5 $R.ce=0.5 $S.ce=0.5
  candidate release_ce1 $R.ce=1.0 $S.ce=1.0
  candidate release_view_randblur2 $R.view=randblur:2 $S.view=randblur:2
  candidate release_view_q2 $R.view=randblur:2+quantize:1.5 $S.view=randblur:2+quantize:1.5
  # The view's own ceiling (no PST: one stage trained on the view only, clean data; a bench's PST column needs >= 2
  # stages, so a plain run): final validation accuracy 83.75 % (standard training: 85.75)
  #   pst-dist train --config launch/configs/fmnist_one_recipe_first.toml --train.threads=1 \
  #     '--schedule.stages=[{name="view_only", loss={ce=0.0, view_ce=1.0, view="randblur:2+quantize:3"}}]' \
  #     --log.run_dir=runs/one_recipe_explore/view_only_clean_run
  ;;
3)
  CONFIG=launch/configs/fmnist_one_recipe_second.toml OUT=runs/one_recipe_explore3
  KEEP0=("$T.freeze=[0]" "$T.group_mults={\"1\"=0.3}")  # group 0 (stem, stage 1) never released after the warm-up
  NAMES=(base ce1_cons3 ce1_keep0 ce2_keep0 freeze1_release1)
  candidate base
  candidate ce1_cons3 $R.ce=1.0 $S.ce=1.0 $R.consistency=3.0 $S.consistency=3.0
  candidate ce1_keep0 $R.ce=1.0 $S.ce=1.0 "${KEEP0[@]}"
  candidate ce2_keep0 $R.ce=2.0 $S.ce=2.0 "${KEEP0[@]}"
  candidate freeze1_release1 $W.epochs=1.0 --schedule.stages.2.epochs=1.0
  ;;
*) echo "ROUND must be 2 or 3, got $ROUND" >&2; exit 2 ;;
esac
.venv/bin/python - "$OUT" "${NAMES[@]}" <<'PY'
import csv, statistics, sys
from pathlib import Path
out, names = Path(sys.argv[1]), sys.argv[2:]
rows = {n: {r["attack"]: 100 * float(r["final_val_acc"]) for r in csv.DictReader(open(out / n / "results.csv"))}
        for n in names if (out / n / "results.csv").exists()}
attacks = sorted({a for r in rows.values() for a in r}, key=lambda a: (a != "none", a))
print("| candidate | " + " | ".join(attacks) + " | worst | mean |")
print("|---|" + "---:|" * (len(attacks) + 2))
for n, r in rows.items():
    xs = [r.get(a, float("nan")) for a in attacks]
    print(f"| `{n}` | " + " | ".join(f"{x:.1f}" for x in xs) + f" | {min(xs):.1f} | {statistics.mean(xs):.1f} |")
PY
