"""tljax's CPU engine: how the operations of `tljax.ops` run on XLA:CPU.

XLA:CPU runs several operations that CNNs are made of far below its matrix-product rate: 1x1
and depthwise convolutions and their gradients, max pooling's gradient (`select_and_scatter`),
stride-1 average pooling, BatchNorm's autodiff gradient. The engine writes each as something
XLA:CPU runs fast, with the same numbers:
- `conv`: a 1x1 convolution as the matrix product it is, with hand-written gradients; a
  larger float32 convolution as the C++ direct convolution (AVX-512);
- `depthwise`: a depthwise convolution as its k*k shifted multiply-adds, or as C++ kernels;
- `pool`: max and average pooling as shifted maxima and sums, or as C++ kernels;
- `batchnorm`: training BatchNorm with a hand-written gradient, or as C++ kernels that also
  apply the activation after it.
The C++ kernels (`tljax.native`, XLA FFI custom calls) are compiled on first use where a C++
compiler is present. docs/performance.md describes each rewrite and kernel and how the tests
hold them equal to XLA's ops.

Which engine runs is one setting, read when a function is traced:
- `native` (the default): the rewrites, with the C++ kernels where they are built;
- `jax`: the rewrites in pure JAX, without the C++ kernels;
- `xla`: XLA's own operations, as on GPUs and TPUs.
Set it for a process with the environment variable `TLJAX_CPU_ENGINE`, or for a block of code
with `tljax.cpu.engine_scope(name)`. On other backends XLA's operations always run.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os
import warnings

import jax

from tljax.native import build as native_build
from tljax.native import conv as native_conv

ENGINES = ("native", "jax", "xla")
VARIABLE = "TLJAX_CPU_ENGINE"

_SCOPE: contextvars.ContextVar[str | None] = contextvars.ContextVar("tljax_cpu_engine",
                                                                   default=None)


def selected() -> str:
    """The engine asked for: `engine_scope`'s, else `$TLJAX_CPU_ENGINE`, else `native` (`jax`
    where the former `TLJAX_NATIVE=0` is set)."""
    name = (_SCOPE.get() or os.environ.get(VARIABLE, "").strip().lower() or _former_name()
            or "native")
    if name not in ENGINES:
        raise ValueError(f"{VARIABLE}={name!r} is not an engine; choose one of "
                         f"{', '.join(ENGINES)}")
    return name


def _former_name() -> str | None:
    """`jax` where `TLJAX_NATIVE` turns the C++ kernels off, as it did before
    `TLJAX_CPU_ENGINE`."""
    if os.environ.get("TLJAX_NATIVE", "").strip().lower() not in ("0", "false", "no", "off"):
        return None
    _warn_former_name()
    return "jax"


@functools.cache
def _warn_former_name() -> None:
    warnings.warn(f"TLJAX_NATIVE=0 is the former name of {VARIABLE}=jax; set {VARIABLE} "
                  "instead", FutureWarning, stacklevel=3)


def engine() -> str:
    """The engine that runs on the current backend: `selected()` on CPU, else `xla`."""
    return selected() if jax.default_backend() == "cpu" else "xla"


@contextlib.contextmanager
def engine_scope(name: str):
    """Within this block, functions traced on CPU use engine `name` (`ENGINES`). It changes how
    a program is traced: a function that `jax.jit` already traced outside the block keeps its
    cached form."""
    if name not in ENGINES:
        raise ValueError(f"unknown CPU engine {name!r}; choose one of {', '.join(ENGINES)}")
    token = _SCOPE.set(name)
    try:
        yield
    finally:
        _SCOPE.reset(token)


def rewrites() -> bool:
    """Whether the engine's rewrites run (on CPU, engine `native` or `jax`)."""
    return engine() != "xla"


def native() -> bool:
    """Whether the C++ kernels run: engine `native`, and the kernels built (a build that fails
    warns once and leaves the pure-JAX rewrites)."""
    return engine() == "native" and native_build.available()


def direct() -> bool:
    """Whether the C++ direct convolution and 1x1 product run: `native()`, on a CPU whose
    kernels were built with AVX-512."""
    return native() and native_conv.direct_available()


def same_padding(n: int, k: int, s: int) -> tuple[int, int]:
    """TensorFlow's 'SAME' padding of an axis of length `n`, kernel `k`, stride `s`: `pad // 2`
    before and the rest after."""
    pad = max((-(-n // s) - 1) * s + k - n, 0)
    return pad // 2, pad - pad // 2
