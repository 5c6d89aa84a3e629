#!/usr/bin/env bash
# Standard training only, at larger budgets, for the attacks whose 8/255 (or default) poison did not make standard
# training collapse in docs/results/bench_fmnist.md: at which budget would it? One seed each, 1 job x 1 thread.
# Usage: launch/bench_budgets.sh [attack ...]   (default: classwise_noise)
set -euo pipefail
cd "$(dirname "$0")/.."
PST=.venv/bin/pst-dist
for attack in "${@:-classwise_noise}"; do
  case "$attack" in
    classwise_noise|em|rem|tap) knob=eps; values="0.0627451 0.1254902" ;;   # 16/255, 32/255
    lsp|ar) knob=l2; values="2.0 4.0" ;;
    *) echo "no larger budget defined for $attack" >&2; continue ;;
  esac
  for v in $values; do
    $PST bench --config launch/configs/bench_fmnist.toml --bench.attacks="[\"$attack\"]" \
      --bench.defenses='["standard"]' --bench.seeds=1 --bench.jobs=1 --train.threads=1 \
      --bench.out="runs/bench_budget/${attack}_${knob}_${v}" \
      "--bench.attack_overrides.${attack}=[\"poison.${knob}=${v}\"]" 2>&1 | grep -a "^|\|\[bench\] cell" || true
  done
done
