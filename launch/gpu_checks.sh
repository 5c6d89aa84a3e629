#!/usr/bin/env bash
# The checks a lent GPU machine runs, as one call (it has torch and timm, no deepspeed / ray / ffcv, no registry):
#   1. the hot loop never synchronises outside logging steps (tests/test_hot_loop.py under CUDA's sync debug mode),
#   2. bench/gpu_throughput.py: the trainer against bare loops, ResNet-18 at 32 px, then ViT-B/16 at 224 px (plain
#      torch, DeepSpeed ZeRO-0 and ZeRO-3),
#   3. the paths CPU tests cannot reach: host values all-reduced under NCCL (one-process group), a streamed image
#      folder's batches through the pinned side-stream copy (tests/test_distributed.py, tests/test_stream.py -k cuda),
#   4. if time is left: the trainer's new run / resume / refusal on CUDA.
# Each step under its own timeout and a shared deadline (BUDGET seconds, default 500), its log and a JSON line with its
# exit status under $OUT, so one failing step does not cost the others. DeepSpeed and pytest come as wheels in .whl/
# (`make gpu-wheels` on a machine with a registry; ../shared/GPU.md), installed into a private target.
#   OUT=/tmp/gpu_out bash launch/gpu_checks.sh
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu_out}
DEADLINE=$((SECONDS + ${BUDGET:-500}))
mkdir -p "$OUT"
SITE=$(mktemp -d "${TMPDIR:-/tmp}/pst-gpu-site.XXXXXX")  # this call's own: nothing another run left or uses
R=$(mktemp -d "${TMPDIR:-/tmp}/pst-gpu-runs.XXXXXX")
trap 'rm -rf "$SITE" "$R"' EXIT
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --target "$SITE" .whl/*.whl >"$OUT/pip.log" 2>&1 \
    && export PYTHONPATH=$PWD:$SITE
fi
step() {  # name, expected exit status, time limit, command...
  local name=$1 want=$2 limit=$3 t0=$SECONDS
  shift 3
  local left=$((DEADLINE - SECONDS))
  if [ "$left" -lt 30 ]; then
    echo "{\"step\": \"$name\", \"skipped\": \"deadline\"}" | tee -a "$OUT/steps.jsonl"
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  echo "{\"step\": \"$name\", \"rc\": $rc, \"expected\": $want, \"seconds\": $((SECONDS - t0))}" | tee -a "$OUT/steps.jsonl"
  grep -v '^\[' "$OUT/$name.log" | grep -v Warning | tail -n 12
}
nvidia-smi -L || true
python3 -c "import torch, deepspeed; print('torch', torch.__version__, 'deepspeed', deepspeed.__version__)" 2>&1 | tail -1

step resnet 0 200 python3 bench/gpu_throughput.py --only resnet18 --epochs 4 --out "$OUT/throughput.jsonl"
step vit 0 330 python3 bench/gpu_throughput.py --only vit --epochs 4 --out "$OUT/throughput.jsonl"
step sync 0 150 python3 -m pytest -q -x -p no:cacheprovider tests/test_hot_loop.py -k cuda
step cuda_paths 0 120 python3 -m pytest -q -x -p no:cacheprovider tests/test_distributed.py tests/test_stream.py -k cuda
T=(--data.source=synthetic --data.synthetic_train=8192 --data.img_size=32 --train.batch_size=256 --train.bf16=true
   --log.progress=false --log.tensorboard=false)
step train 0 90 python3 -m pst_dist.cli train "${T[@]}" --train.epochs=2 --log.run_dir=$R/a
step resume 0 90 python3 -m pst_dist.cli train "${T[@]}" --train.epochs=3 --log.run_dir=$R/a --resume
step refuse 2 60 python3 -m pst_dist.cli train "${T[@]}" --train.epochs=3 --log.run_dir=$R/a
