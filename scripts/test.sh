#!/usr/bin/env bash
# Set up .venv and run the test suite. `--slow` runs only the slow checks (B6/B7 parity, ...);
# other arguments go to pytest. pytest's exit status is kept: "no tests ran" (5) fails.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
args=()
for a in "$@"; do
  if [ "$a" = "--slow" ]; then args+=(-m slow); else args+=("$a"); fi
done
exec .venv/bin/python -m pytest "${args[@]}"
