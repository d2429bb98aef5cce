"""The shifted windows that the engine's pure-JAX rewrites are written with.

A k x k operation over an image (a depthwise convolution, a pooling) is the sum, or the
maximum, of k*k shifted copies of it, one per tap; XLA fuses such an elementwise expression
into a single pass.
"""

from __future__ import annotations

import functools
import operator

import jax.numpy as jnp

from tljax import cpu


def sum_of(terms):
    """`t0 + t1 + ...`, added left to right: one elementwise expression, one fused pass."""
    return functools.reduce(operator.add, terms)


def phase_rows(n: int, k: int, s: int):
    """For one spatial axis of length `n`: (output length, padding before, the phase index
    range [u0, u1) that covers the unpadded input, phase length covering every tap)."""
    o = -(-n // s)
    p0 = cpu.same_padding(n, k, s)[0]
    return o, p0, p0 // s, -(-(p0 + n) // s), -(-((o - 1) * s + k) // s)


def same_windows(x, k: int, s: int):
    """The k*k windows of `x` padded 'SAME' as TensorFlow, at stride `s`, in row-major order,
    each the output's shape: contiguous slices of the s*s phases of the padded input (the
    positions congruent to (a, b) mod s), which the kernel gradient reads faster than strided
    slices. Stride 1: slices of the padded input."""
    n, h, w, c = x.shape
    oh, pt, _, _, ph = phase_rows(h, k, s)
    ow, pl, _, _, pw = phase_rows(w, k, s)
    xp = jnp.pad(x, ((0, 0), (pt, ph * s - h - pt), (pl, pw * s - w - pl), (0, 0)))
    phases = xp.reshape(n, ph, s, pw, s, c).transpose(2, 4, 0, 1, 3, 5)
    return [phases[i % s, j % s, :, i // s:i // s + oh, j // s:j // s + ow]
            for i in range(k) for j in range(k)]


def valid_windows(x, k: int, s: int):
    """The k*k 'VALID' windows of `x` at stride `s`, in row-major window order, each the
    output's shape."""
    oh, ow = (x.shape[1] - k) // s + 1, (x.shape[2] - k) // s + 1
    return [x[:, i:i + s * (oh - 1) + 1:s, j:j + s * (ow - 1) + 1:s, :]
            for i in range(k) for j in range(k)]
