"""Max pooling on CPU as two C++ kernels (`pool_cpu.cc`): 'VALID' k x k windows at stride s,
NHWC float32, with its gradient.

`max_pool(x, window, stride)`: the same maxima as `flax.linen.max_pool(..., 'VALID')` and as
the pure-JAX shifted maxima of `tljax.cpu.pool.max_taps`; the gradient gives each output's
dy to the first input of its window (row-major) that equals the maximum, as XLA's
`select_and_scatter` and the pure-JAX form do (where windows overlap, an input's shares are
added in output order: last-bit differences from the pure-JAX form). XLA:CPU fuses the
pure-JAX gradient of overlapping windows into loops that place each tap's share by division,
which run slowly.

Call it only where `tljax.native.build.available()`; `tljax.cpu.pool` decides.
"""

from __future__ import annotations

import jax
import numpy as np

from tljax.native import build


def _attrs(window: int, stride: int) -> dict:
    return dict(window=np.int64(window), stride=np.int64(stride))


def _forward(x, window: int, stride: int):
    n, h, w, c = x.shape
    shape = (n, (h - window) // stride + 1, (w - window) // stride + 1, c)
    return build.call("tljax_max_pool_forward", [shape], x, **_attrs(window, stride))[0]


def _forward_fwd(x, window, stride):
    out = _forward(x, window, stride)
    return out, (x, out)


def _forward_bwd(window, stride, res, dy):
    x, out = res
    return (build.call("tljax_max_pool_backward", [x.shape], x, out, dy,
                       **_attrs(window, stride))[0],)


def _make():
    f = jax.custom_vjp(_forward, nondiff_argnums=(1, 2))
    f.defvjp(_forward_fwd, _forward_bwd)
    return f


_max_pool = _make()


def max_pool(x, window: int, stride: int):
    """(N, H, W, C) -> (N, (H - window) // stride + 1, (W - window) // stride + 1, C)."""
    if x.ndim != 4 or x.dtype != np.float32:
        raise ValueError(f"max_pool: x must be (N, H, W, C) float32, got {x.dtype}{x.shape}")
    if window < 1 or stride < 1 or min(x.shape[1:3]) < window:
        raise ValueError(f"max_pool: window {window} and stride {stride} must be >= 1 and the "
                         f"image {x.shape[1:3]} at least a window wide")
    return _max_pool(x, int(window), int(stride))
