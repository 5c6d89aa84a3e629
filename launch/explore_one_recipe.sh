#!/usr/bin/env bash
# Screen changes to the first search's PST recipe (launch/configs/fmnist_one_recipe_first.toml) on *validation*
# accuracy before a `pst-dist tune` search over the survivors: the recipe's PST cell, seed 0 only, once per candidate, on the bench's
# cached poisons (runs/bench_fmnist/poisons, linked; missing ones are made). TAP is never run here (held out); the
# test split is not read. Prints each candidate's final validation accuracy per attack and the worst case.
# Usage: launch/explore_one_recipe.sh [ATTACKS_JSON]   (default: clean + the 3 attacks PST did worst on)
# Each candidate: ~1.5 min per attack on 2 cores; finished candidates are skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=launch/configs/fmnist_one_recipe_first.toml
ATTACKS=${1:-'["none","conv_blur","lsp","em"]'}
OUT=runs/one_recipe_explore
source launch/_jobs.sh
candidate() {  # name, overrides...
  local name=$1
  shift
  echo "== $name: $*"
  pst_candidate "$OUT/$name" "$CONFIG" --bench.attacks="$ATTACKS" "$@"
}
R='--schedule.stages.2.loss' S='--schedule.stages.3.loss'
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
