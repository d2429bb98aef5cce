"""Depthwise convolutions on XLA:CPU: the k*k shifted multiply-adds they are, or C++ kernels.

XLA:CPU runs a `feature_group_count` convolution, and above all its gradients, far slower than
the elementwise loops of its taps, which it fuses; the gradients are written by hand in the
same form (`_taps_bwd`). With the C++ kernels built, `tljax.native.depthwise` computes the same
sums, one pass each for the forward and both gradients.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from tljax import cpu
from tljax.cpu.windows import phase_rows, same_windows, sum_of
from tljax.native import depthwise as native_depthwise
from tljax.varying import varying_like


def depthwise(x, kernel, stride: int):
    """(N, H, W, C) x (k, k, 1, C) -> (N, H', W', C), 'SAME' padding as TensorFlow."""
    k = kernel.shape[0]
    if x.dtype == jnp.float32 and cpu.native():
        padding = (cpu.same_padding(x.shape[1], k, stride),
                   cpu.same_padding(x.shape[2], k, stride))
        return native_depthwise.depthwise(x, *varying_like(x, kernel), stride, padding)
    return depthwise_taps(x, *varying_like(x, kernel), stride)


def _taps(x, kernel, s: int):
    """The forward multiply-adds: 'SAME' padding as TensorFlow, stride `s`."""
    k = kernel.shape[0]
    return sum_of(window * kernel[n // k, n % k, 0]
                  for n, window in enumerate(same_windows(x, k, s)))


def _taps_fwd(x, kernel, s):
    return _taps(x, kernel, s), (x, kernel)


def _taps_bwd(s, res, dy):
    """Both gradients in the forward's own form, a few fused passes, computed phase by phase:
    at stride `s` the padded input splits into s*s phases (the positions congruent to (a, b)
    mod s), each of which meets only the taps congruent to it.

    Input: in each phase, a correlation of dy with that phase's taps, then the phases
    interleaved; autodiff's transpose is instead a sum of k*k padded copies of dy with
    interior padding (s*s times the multiply-adds, most of them by zero), which XLA fuses
    into, and recomputes in, each consumer. Kernel: each tap's window, a contiguous slice of
    its phase, times dy summed over batch and space (`_tap_sums`). Stride 1 is the one-phase
    case."""
    x, kernel = res
    return _phase_dx(dy, kernel, x.shape[1], x.shape[2], s), _phase_dk(x, dy, kernel, s)


def _phase_dk(x, dy, kernel, s: int):
    k = kernel.shape[0]
    return _tap_sums(same_windows(x, k, s), dy).reshape(kernel.shape).astype(kernel.dtype)


def _phase_dx(dy, kernel, h: int, w: int, s: int):
    """dx[r] = sum over taps i with r + pad = o*s + i of kernel[i] * dy[o], for each phase
    a = (r + pad) mod s a correlation of dy with the taps i = a + s*d, over the phase
    positions u0 <= u < u1 that cover the input, then cropped to it."""
    k = kernel.shape[0]
    oh, pt, u0, u1, _ = phase_rows(h, k, s)
    ow, pl, v0, v1, _ = phase_rows(w, k, s)
    n, c = dy.shape[0], dy.shape[-1]
    d = -(-k // s) - 1  # the most taps a phase meets along an axis, less one
    ft, fl = max(0, d - u0), max(0, d - v0)
    dyp = jnp.pad(dy, ((0, 0), (ft, max(0, u1 - oh)), (fl, max(0, v1 - ow)), (0, 0)))
    rows = []
    for a in range(s):
        cols = []
        for b in range(s):
            taps = [(di, dj) for di in range(-(-(k - a) // s)) for dj in range(-(-(k - b) // s))]
            cols.append(sum_of(dyp[:, u0 - di + ft:u1 - di + ft, v0 - dj + fl:v1 - dj + fl]
                               * kernel[a + s * di, b + s * dj, 0] for di, dj in taps)
                        if taps else jnp.zeros((n, u1 - u0, v1 - v0, c), dy.dtype))  # k < s
        rows.append(jnp.stack(cols, 3))
    dx = jnp.stack(rows, 2).reshape(n, (u1 - u0) * s, (v1 - v0) * s, c)
    return dx[:, pt - u0 * s:pt - u0 * s + h, pl - v0 * s:pl - v0 * s + w]


def _tap_sums(windows, dy, groups: int = 16):
    """(k*k, C): each window times dy, summed over batch and space, in float32.

    The batch is split into up to `groups` equal slices whose products are added as one
    elementwise expression, which XLA fuses into a single pass per tap that reads the window and
    dy once and writes a 1/`groups` partial sum; the small sum over the rest follows. (XLA:CPU
    writes each tap's product out first when it reduces over the leading axes.)"""
    n = dy.shape[0]
    g = max(d for d in range(1, min(n, groups) + 1) if n % d == 0)
    m = n // g
    dy = dy.astype(jnp.float32)
    windows = [window.astype(jnp.float32) for window in windows]
    sums = [sum_of(window[i * m:(i + 1) * m] * dy[i * m:(i + 1) * m] for i in range(g))
            for window in windows]
    return jnp.stack(sums).sum((1, 2, 3))


def _depthwise_taps():
    f = jax.custom_vjp(_taps, nondiff_argnums=(2,))
    f.defvjp(_taps_fwd, _taps_bwd)
    return f


# A depthwise convolution (N, H, W, C) x (k, k, 1, C) -> (N, H', W', C), 'SAME' padding, as
# k*k multiply-adds, with the gradients of `_taps_bwd`.
depthwise_taps = _depthwise_taps()
