#!/usr/bin/env bash
# Standard training only, at larger budgets, for the attacks whose 8/255 (or default) poison did not make standard
# training collapse in docs/results/bench_fmnist.md: at which budget would it? One seed each, 1 job x 1 thread.
# Usage: [VALUES="v1 v2"] launch/bench_budgets.sh [attack ...]   (default: classwise_noise)
set -euo pipefail
cd "$(dirname "$0")/.."
PST=.venv/bin/pst-dist
failed=0
for attack in "${@:-classwise_noise}"; do
  case "$attack" in
    classwise_noise|em|rem|tap) knob=eps; values="0.0627451 0.1254902" ;;   # 16/255, 32/255
    lsp|ar) knob=l2; values="1.0 2.0" ;;   # per-image L2 (default on 28x28x1: AR 0.505, LSP 0.66)
    ops|conv_blur) knob=augment; values="none" ;;   # L0 = 1 / no Lp bound: try without the random-crop augmentation
    *) echo "no larger budget defined for $attack" >&2; continue ;;
  esac
  values="${VALUES:-$values}"   # e.g. VALUES=0.0627451 for one budget only
  for v in $values; do
    if [ "$knob" = augment ]; then extra=("--data.augment=$v"); else extra=("--poison.${knob}=${v}"); fi
    $PST bench --config launch/configs/bench_fmnist.toml --bench.attacks="[\"$attack\"]" \
      --bench.defenses='["standard"]' --bench.seeds=1 --bench.jobs=1 --train.threads=1 \
      --bench.out="runs/bench_budget/${attack}_${knob}_${v}" \
      "${extra[@]}" 2>&1 | { grep -a -E "^\||\[bench\] (cell|FAILED)|error" || true; } || failed=1
  done
done
exit "$failed"  # a refused config or a failed cell is this script's failure (pipefail: the bench's exit status)
