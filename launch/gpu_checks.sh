#!/usr/bin/env bash
# The checks a lent GPU machine runs (it has torch and timm, no deepspeed / ray / ffcv, no registry): the trainer on
# CUDA (a new run, a resume, a refused second run, a diverging run), then bench/gpu_throughput.py. Each step under its
# own timeout, its log and a JSON line with its exit status under $OUT, so one failing step does not cost the others.
#   OUT=/tmp/gpu_out bash launch/gpu_checks.sh
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
R=/tmp/pst_gpu_runs
rm -rf "$R"
T=(--data.source=synthetic --data.synthetic_train=8192 --data.img_size=32 --train.batch_size=256 --train.bf16=true
   --log.progress=false --log.tensorboard=false --train.deterministic=false)
step() {  # name, expected exit status, command...
  local name=$1 want=$2 t0=$SECONDS
  shift 2
  timeout 180 "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  echo "{\"step\": \"$name\", \"rc\": $rc, \"expected\": $want, \"seconds\": $((SECONDS - t0))}" | tee -a "$OUT/steps.jsonl"
  tail -n 2 "$OUT/$name.log"
}
nvidia-smi -L || true
step train 0 python3 -m pst_dist.cli train "${T[@]}" --train.epochs=2 --log.run_dir=$R/a
step resume 0 python3 -m pst_dist.cli train "${T[@]}" --train.epochs=3 --log.run_dir=$R/a --resume
step refuse 2 python3 -m pst_dist.cli train "${T[@]}" --train.epochs=3 --log.run_dir=$R/a
step diverge 3 python3 -m pst_dist.cli train "${T[@]}" --train.epochs=2 --train.lr=1e6 --train.lr_schedule=constant \
  '--schedule.stages=[{name="calm",epochs=1,lr_mult=1e-9},{name="wild"}]' --log.run_dir=$R/d
step throughput 0 timeout 400 python3 bench/gpu_throughput.py --epochs 4 --out "$OUT/throughput.jsonl"
grep -v '^\[' "$OUT/throughput.log" | tail -n 4
