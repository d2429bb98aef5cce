#!/usr/bin/env bash
# Set up .venv and run the test suite. Other arguments go to pytest. pytest's exit status is
# kept: "no tests ran" (5) fails.
#   --slow          only the slow checks (B6/B7 parity, ...)
#   --kernels off   the tests of layers, steps and parallelism (or the test files given) again
#                   with tljax's C++ CPU kernels off (TLJAX_CPU_ENGINE=jax): the pure-JAX path of a
#                   machine without g++
#   --kernels avx2  the same tests with the kernels built for x86-64-v3 (AVX2 and FMA, no
#                   AVX-512) and XLA capped at AVX2: the path of a CPU without AVX-512, on a CPU
#                   with it (on one without, it is the path the whole suite took)
set -euo pipefail
cd "$(dirname "$0")/.."
PATH_TESTS=(tests/test_layers.py tests/test_varying.py tests/test_native.py
            tests/test_parallel.py tests/test_freeze_training.py)
args=()
kernels=none
files=0
while [ $# -gt 0 ]; do
  case "$1" in
    --slow) args+=(-m slow) ;;
    --kernels)
      if [ $# -lt 2 ]; then echo "test.sh: --kernels takes 'off' or 'avx2'" >&2; exit 2; fi
      kernels="$2"; shift ;;
    --kernels=*) kernels="${1#--kernels=}" ;;
    -k|-m|-p|--deselect|--durations|--maxfail|-n|--dist|--rootdir|-c|-o)  # an option's value
      args+=("$1"); [ $# -lt 2 ] || { args+=("$2"); shift; } ;;
    *) args+=("$1"); if [ -e "${1%%::*}" ]; then files=1; fi ;;
  esac
  shift
done
case "$kernels" in
  none) ;;
  off) export TLJAX_CPU_ENGINE=jax ;;
  avx2)
    if ! grep -qw avx2 /proc/cpuinfo 2>/dev/null; then
      echo "test.sh: --kernels avx2 needs an x86-64 CPU with AVX2; this one has none" >&2
      exit 2
    fi
    export TLJAX_NATIVE_MARCH=x86-64-v3
    export XLA_FLAGS="${XLA_FLAGS:-} --xla_cpu_max_isa=AVX2" ;;
  *) echo "test.sh: --kernels takes 'off' or 'avx2', got '$kernels'" >&2; exit 2 ;;
esac
if [ "$kernels" != none ] && [ "$files" = 0 ]; then
  args+=("${PATH_TESTS[@]}")
fi
bash scripts/setup.sh
exec .venv/bin/python -m pytest "${args[@]}"
