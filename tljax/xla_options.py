"""The XLA compiler options tljax compiles its programs with, per backend, and `jit`, which
applies them.

XLA:CPU (jaxlib 0.10) hands three kinds of work to the YNNPACK library by default: single
matrix products, single convolutions and reductions. Its convolutions are the slow ones on
x86 (2-4x slower than XLA's own Eigen convolutions, forward and both gradients), while its
products and reductions are the fast ones (docs/performance.md).

So on CPU tljax compiles with YNNPACK's convolutions off (the same as
`XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=-individual_convolution`). It sets nothing
on GPUs and TPUs, nothing when the user's `XLA_FLAGS` set that flag themselves, and nothing with
`TLJAX_XLA_OPTIONS=0` in the environment. The options are per compiled program
(`jax.jit(..., compiler_options=...)`), not process-wide: other JAX code in the process keeps
XLA's defaults. `jax.pmap` takes no compiler options, so the `pmap` form of
`parallel.compile_train_step` runs on XLA's defaults.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

_YNN = "xla_cpu_experimental_ynn_fusion_type"
# XLA's default set (jaxlib 0.10: individual dots, individual convolutions, reductions) less
# the convolutions, by name: per-program options take no '-' prefix. tests/test_xla_options.py
# compares the compiled result with XLA_FLAGS' `-individual_convolution`, so that a jaxlib whose
# default set differs fails there rather than silently losing (or gaining) YNNPACK fusions.
CPU = {_YNN: "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"}


def for_platform(platform: str) -> dict[str, Any] | None:
    """The options for programs on `platform` ('cpu', 'gpu', 'tpu'), or None for XLA's
    defaults."""
    if os.environ.get("TLJAX_XLA_OPTIONS", "1") == "0":
        return None
    if platform != "cpu" or _YNN in os.environ.get("XLA_FLAGS", ""):
        return None
    return dict(CPU)


def jit(fn: Callable, *, devices=None, **kwargs) -> Callable:
    """`jax.jit(fn, **kwargs)` with tljax's options for the platform of `devices` (default: JAX's
    default backend)."""
    import jax  # here, so that importing this module (from command-line entry points) stays light

    platform = (next(iter(devices)).platform if devices is not None
                else jax.default_backend())
    return jax.jit(fn, compiler_options=for_platform(platform), **kwargs)
