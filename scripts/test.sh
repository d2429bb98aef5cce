#!/usr/bin/env bash
# Set up .venv and run the test suite. Other arguments go to pytest. pytest's exit status is
# kept: "no tests ran" (5) fails.
#   --slow          only the slow checks (B6/B7 parity, ...)
#   --kernels off   the tests of layers, steps and parallelism again with tljax's C++ CPU
#                   kernels off (TLJAX_NATIVE=0): the pure-JAX path of a machine without g++
#   --kernels avx2  the same tests with the kernels built for x86-64-v3 (AVX2 and FMA, no
#                   AVX-512) and XLA capped to AVX2: the path of a CPU without AVX-512, on a CPU
#                   with it (on one without, it is the path the whole suite took)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PATH_TESTS=(tests/test_layers.py tests/test_varying.py tests/test_native.py
            tests/test_parallel.py tests/test_freeze_training.py)
args=()
kernels=""
while [ $# -gt 0 ]; do
  case "$1" in
    --slow) args+=(-m slow) ;;
    --kernels) kernels="${2:-}"; shift ;;
    --kernels=*) kernels="${1#--kernels=}" ;;
    *) args+=("$1") ;;
  esac
  shift
done
case "$kernels" in
  "") ;;
  off) export TLJAX_NATIVE=0 ;;
  avx2) export TLJAX_NATIVE_MARCH=x86-64-v3
        export XLA_FLAGS="${XLA_FLAGS:-} --xla_cpu_max_isa=AVX2" ;;
  *) echo "test.sh: --kernels takes 'off' or 'avx2', got '$kernels'" >&2; exit 2 ;;
esac
if [ -n "$kernels" ] && ! printf '%s\n' "${args[@]}" | grep -q '^tests'; then
  args+=("${PATH_TESTS[@]}")
fi
exec .venv/bin/python -m pytest "${args[@]}"
