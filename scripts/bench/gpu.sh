#!/usr/bin/env bash
# The accelerator benchmark of docs/benchmarks.md, as one command for a lent GPU machine:
# ResNet50 (the performance issue's target), its full step's ablations (gpu_ablation.sh), then
# EfficientNet-B0; bf16, batch 256, 224x224, tljax beside PyTorch eager, each model's figures
# written before the next starts (about 7 minutes on an H200).
#   bash scripts/bench/gpu.sh OUTDIR [extra scripts/benchmark.py arguments]
# Uses the machine's own jax/flax/optax; if tljax does not import with them, installs the wheels
# carried in .whl/ (the versions this project pins) into /tmp/site first. At most 8 files in
# OUTDIR (the device tool brings back 8); charts are drawn afterwards from the JSON.
set -u
out=${1:?usage: gpu.sh OUTDIR [benchmark.py args]}
shift
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv || true
if ! $py -c "import tljax.models, tljax.train_step, tljax.parallel" 2>"$out/import.log"; then
  tail -3 "$out/import.log"
  echo "tljax does not import with this machine's packages: installing .whl/"
  $py -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
$py -c "import jax, flax, optax, torch; print('jax', jax.__version__, 'flax', flax.__version__,
'optax', optax.__version__, 'torch', torch.__version__, jax.devices())"
$py scripts/benchmark.py --models resnet50 --frameworks tljax torch --steps 10 --warmup 3 \
  --timeout 300 --json "$out/gpu_resnet50.json" --plot "" \
  --logs "$out/logs_resnet50" "$@" 2>&1 | tee "$out/gpu_resnet50.txt"
bash scripts/bench/gpu_ablation.sh "$out/gpu_resnet50_ablation.txt"
timeout 240 $py scripts/benchmark.py --models efficientnet_b0 --frameworks tljax torch \
  --steps 10 --warmup 3 --timeout 200 --json "$out/gpu_b0.json" --plot "" \
  "$@" 2>&1 | tee "$out/gpu_b0.txt"
