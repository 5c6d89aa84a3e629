#!/usr/bin/env bash
# How the default PST schedule was chosen: Fashion-MNIST, 10k-image training subset, 4 epochs, seed 0, one thread
# per run, selection on the clean *validation* split (2000 images carved from the test set, disjoint from test).
# Regenerates docs/results/fmnist_exploration.md:   launch/explore_fmnist.sh   (OUT=runs/explore JOBS=2)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/explore}
JOBS=${JOBS:-2}
BASE=(--data.source=fashion-mnist --data.val_from=test --data.val_size=2000 --data.train_size=10000
      --model.width=0.25 --model.stem_pool=true --train.epochs=4 --log.progress=false --log.tensorboard=false
      --train.threads=1)
P=(--poison.kind=patch_noise --schedule.check_every=20)
Q='view="quantize",view_strength=3.0'
declare -A RUNS=(
  [clean_standard]="--poison.kind=none"
  [std_patch4]="${P[*]}"
  [std_patch2]="${P[*]} --poison.patch_size=2"
  [blur_view_only]="${P[*]} --schedule.stages=[{name=\"v\",loss={ce=0.0,view_ce=1.0}}]"
  [quantize4_view_only]="${P[*]} --schedule.stages=[{name=\"v\",loss={ce=0.0,view_ce=1.0,$Q}}]"
  [quantize3_view_only]="${P[*]} --schedule.stages=[{name=\"v\",loss={ce=0.0,view_ce=1.0,view=\"quantize\",view_strength=6.0}}]"
  [naive_freeze_after_1]="${P[*]} --schedule.stages=[{name=\"all\",epochs=1},{name=\"frozen\",freeze=[0,1,2]}]"
  [pstA]="${P[*]} --schedule.stages=[{name=\"warm\",epochs=1,trigger={kind=\"shortcut_gap\",threshold=0.2,view=\"quantize\"},loss={ce=1.0,view_ce=1.0,$Q}},{name=\"suppress\",epochs=2,freeze=[0,1],reinit_head=true,loss={ce=0.0,view_ce=1.0,$Q}},{name=\"release\",group_mults={\"0\"=0.1,\"1\"=0.1},loss={ce=0.0,view_ce=1.0,$Q}}]"
  [pstB]="${P[*]} --schedule.stages=[{name=\"warm\",epochs=1,trigger={kind=\"shortcut_gap\",threshold=0.2,view=\"quantize\"},loss={ce=1.0,view_ce=1.0,$Q}},{name=\"suppress\",epochs=2,freeze=[0,1],reinit_head=true,loss={ce=0.0,view_ce=1.0,consistency=1.0,$Q}},{name=\"release\",group_mults={\"0\"=0.1,\"1\"=0.1},loss={ce=0.0,view_ce=1.0,consistency=1.0,$Q}}]"
)
mkdir -p "$OUT"
for name in "${!RUNS[@]}"; do
  run="$OUT/${name}_seed0"
  [ -f "$run/summary.json" ] && continue
  read -ra extra <<< "${RUNS[$name]}"  # no override contains a space
  printf '%q ' .venv/bin/pst-dist train "${BASE[@]}" "${extra[@]}" --log.run_dir="$run" --resume=auto  # cut short?
  printf '> %q 2>&1\n' "$run.log"
done | xargs -d '\n' -P "$JOBS" -I{} bash -c '{}'
.venv/bin/pst-dist report "$OUT"
