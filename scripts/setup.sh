#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment in .venv and install tljax with
# everything it needs (`.[dev]`), at the exact versions of constraints.txt (the set the tests
# ran with; pyproject.toml holds the compatible ranges). Re-running is cheap: the install is
# skipped while pyproject.toml and constraints.txt are unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
fi
stamp=".venv/.tljax-installed"
want="$(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "setup: installing tljax and its tested stack into .venv (a few minutes the first time)"
  .venv/bin/python -m pip install --quiet --upgrade pip
  # torch first, on its own, so that nothing pulls a multi-GB accelerator build of it.
  .venv/bin/python -m pip install --quiet -c constraints.txt torch
  .venv/bin/python -m pip install --quiet -c constraints.txt -e ".[dev]"
  echo "$want" > "$stamp"
fi
# tljax's C++ CPU kernels (tljax/native), built once per machine here rather than by the first
# run; without a C++ compiler tljax warns and uses its pure-JAX layers (same numbers, slower).
.venv/bin/python -m tljax.native.build >/dev/null || echo "setup: the C++ CPU kernels were not built (see above); tljax will use its pure-JAX layers"
