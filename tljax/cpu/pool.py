"""Pooling on XLA:CPU: max pooling as shifted maxima or a C++ kernel, stride-1 average pooling
as shifted sums.

XLA:CPU's `select_and_scatter`, the gradient autodiff writes for a max `reduce_window`, and its
`reduce_window` sums run several times slower than the same windows written as elementwise
maxima and sums, which XLA fuses. Overlapping float32 max-pooling windows (ResNet's and
InceptionV3's 3x3 at stride 2) go to `tljax.native.pool` where the C++ kernels are built; VGG's
2x2 windows at stride 2 do not overlap, and there the shifted form is the faster one.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from tljax import cpu
from tljax.cpu.windows import same_windows, sum_of, valid_windows
from tljax.native import pool as native_pool


def max_pool(x, window: int, stride: int):
    """'VALID' max pooling, `window` x `window` at `stride`."""
    if window > stride and x.ndim == 4 and x.dtype == jnp.float32 and cpu.native():
        return native_pool.max_pool(x, window, stride)
    return max_taps(x, window, stride)


def _max_taps(x, k: int, s: int):
    return functools.reduce(jnp.maximum, valid_windows(x, k, s))


def _max_taps_fwd(x, k, s):
    out = _max_taps(x, k, s)
    return out, (x, out)


def _max_taps_bwd(k, s, res, dy):
    """Each output's gradient goes to the first input of its window (row-major order) that
    equals the maximum, as `select_and_scatter` does for `reduce_window` max (and TensorFlow's
    MaxPoolGrad): the same choice, ties included (where windows overlap, an input's shares add
    up in another order: last-bit differences). Each tap's share is placed back at its
    strided positions by padding (the transpose of the strided slice); the k*k padded arrays
    add up in one fused pass."""
    x, out = res
    h, w = x.shape[1], x.shape[2]
    oh, ow = out.shape[1], out.shape[2]
    zero = jnp.zeros((), dy.dtype)
    taken = None
    dx = None
    for n, window in enumerate(valid_windows(x, k, s)):
        i, j = divmod(n, k)
        hit = window == out
        if taken is not None:
            hit = hit & ~taken
        taken = hit if taken is None else taken | hit
        share = jax.lax.pad(jnp.where(hit, dy, zero), zero,
                            ((0, 0, 0), (i, h - i - s * (oh - 1) - 1, s - 1),
                             (j, w - j - s * (ow - 1) - 1, s - 1), (0, 0, 0)))
        dx = share if dx is None else dx + share
    return (dx,)


def _make_max_taps():
    f = jax.custom_vjp(_max_taps, nondiff_argnums=(1, 2))
    f.defvjp(_max_taps_fwd, _max_taps_bwd)
    return f


# 'VALID' max pooling (N, H, W, C) -> (N, H', W', C), window k, stride s, as k*k maxima, with
# the gradient of `_max_taps_bwd`.
max_taps = _make_max_taps()


def _box_sum(x, k: int):
    """Sums over the k*k window around each pixel (zero padding, odd k), in row-major order."""
    return sum_of(same_windows(x, k, 1))


def _inverse_counts(h: int, w: int, k: int, dtype):
    """1 / the number of real pixels in each k*k 'SAME' window of an h x w map (a constant)."""
    p = k // 2
    ones = np.pad(np.ones((h, w)), p)
    counts = sum(ones[i:i + h, j:j + w] for i in range(k) for j in range(k))
    return jnp.asarray((1.0 / counts)[None, :, :, None], dtype)


def _mean_taps(x, k: int):
    return _box_sum(x, k) * _inverse_counts(x.shape[1], x.shape[2], k, x.dtype)


def _mean_taps_bwd(k, _, dy):
    """The window is symmetric: the transpose of its box sum is the box sum of the cotangent,
    here divided by the counts first."""
    return (_box_sum(dy * _inverse_counts(dy.shape[1], dy.shape[2], k, dy.dtype), k),)


def _make_mean_taps():
    f = jax.custom_vjp(_mean_taps, nondiff_argnums=(1,))
    f.defvjp(lambda x, k: (_mean_taps(x, k), None), _mean_taps_bwd)
    return f


# Stride-1 'SAME' average pooling without the pad, odd window k, as k*k shifted sums, with the
# gradient of `_mean_taps_bwd`.
mean_taps = _make_mean_taps()
