#!/usr/bin/env bash
# The main job on its embedded default (no download, no data of yours): sets up .venv, then
# converts the bundled ImageNet EfficientNet-Lite0 and classifies the bundled photos.
# Extra arguments go to `python -m tljax.demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m tljax.demo "$@"
