#!/usr/bin/env bash
# Where the ResNet50 bf16 full step's time goes on a GPU: the tljax worker's full step (batch
# 256, 224x224) as is, with every BatchNorm on its moving statistics (no batch statistics), at
# batch 512, without XLA's autotuning, and without CUDA graphs (command buffers).
#   bash scripts/bench/gpu_ablation.sh OUTFILE
# One JSON line per variant (RESULT ...), the variant's name first, appended to OUTFILE.
set -u
out=${1:?usage: gpu_ablation.sh OUTFILE}
py=${PYTHON:-python3}
size=${SIZE:-224} batch=${BATCH:-256} steps=${STEPS:-10}  # smaller for a trial run on CPU
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
run() {  # name, XLA_FLAGS, worker arguments...
  local name=$1 flags=$2
  shift 2
  echo "== $name"
  XLA_FLAGS=$flags timeout 150 $py scripts/bench/run_tljax.py --model resnet50 --size "$size" \
    --kinds full_step --steps "$steps" --warmup 3 "$@" 2>&1 | grep '^RESULT' | sed "s/^/$name /" \
    | tee -a "$out" | cut -c1-120
}
run bn_inference "" --batch "$batch" --bn inference
run batch512 "" --batch $((2 * batch))
run no_autotune "--xla_gpu_autotune_level=0" --batch "$batch"
run no_command_buffer "--xla_gpu_enable_command_buffer=" --batch "$batch"
