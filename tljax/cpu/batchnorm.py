"""Training BatchNorm on XLA:CPU: flax's numbers with a hand-written gradient, or C++ kernels
that also apply the activation after it (`tljax.native.batchnorm`).

Autodiff of the two-pass variance writes several full-size intermediates that its backward
reads again; the hand-written gradient is two reductions and one elementwise pass, and the C++
kernels read x a few times and write y (dx) once.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

from tljax import cpu
from tljax.native import batchnorm as native_batchnorm
from tljax.varying import varying_like


def train(x, scale, bias, eps: float, activation=None):
    """`(activation(y), mean, var)` of BatchNorm on the batch statistics of float32 `x` over
    every axis but the last, as flax computes them (two-pass variance); `scale` may be None."""
    scale, bias = varying_like(x, scale, bias)
    if cpu.native():
        fused = activation if activation in native_batchnorm.ACTIVATIONS else None
        y, mean, var = native_batchnorm.bn_act(x, scale, bias, eps, fused)
        if fused is not activation:
            y = activation(y)
        return y, mean, var
    y, mean, var = bn_train(x, scale, bias, eps)
    return (y if activation is None else activation(y)), mean, var


def _bn_train(x, scale, bias, eps: float):
    """BatchNorm on the batch's statistics over every axis but the last (channels):
    `(y, mean, var)`, as flax computes them (`_compute_stats` without the fast variance, then
    `_normalize`)."""
    axes = tuple(range(x.ndim - 1))
    mean = x.mean(axes)
    var = jnp.square(x - mean).mean(axes)
    mul = jax.lax.rsqrt(var + eps)
    if scale is not None:
        mul = mul * scale
    return (x - mean) * mul + bias, mean, var


def _bn_train_fwd(x, scale, bias, eps):
    out = _bn_train(x.value, None if scale is None else scale.value, bias.value, eps)
    mean, var = out[1], out[2]
    return out, (x.value, mean, jax.lax.rsqrt(var + eps), None if scale is None else scale.value)


def _bn_train_bwd(eps, res, cotangents):
    """The gradient of `_bn_train` in two reductions and one elementwise pass. With
    xhat = (x - mean) * r, r = 1 / sqrt(var + eps): dbias = sum dy, dscale = sum dy * xhat,
    dx = scale * r * (dy - dbias / n - xhat * dscale / n); cotangents of the returned mean and
    variance (zero in a train step, where they only feed the moving averages, and then skipped
    symbolically) add dmean / n and dvar * 2 (x - mean) / n
    (`native_batchnorm.add_stats_cotangents`)."""
    x, mean, r, scale = res
    dy, dmean, dvar = cotangents
    n, axes = x.size // x.shape[-1], tuple(range(x.ndim - 1))
    xc = x - mean
    if isinstance(dy, SymbolicZero):
        dy = jnp.zeros_like(x)
    dbias = dy.sum(axes)
    dscale = (dy * (xc * r)).sum(axes)
    mul = r if scale is None else r * scale
    dx = mul * (dy - dbias / n - (xc * r) * (dscale / n))
    dx = native_batchnorm.add_stats_cotangents(dx, x, mean, dmean, dvar)
    return dx, None if scale is None else dscale, dbias


def _make_bn_train():
    f = jax.custom_vjp(_bn_train, nondiff_argnums=(3,))
    f.defvjp(_bn_train_fwd, _bn_train_bwd, symbolic_zeros=True)
    return f


# `(y, mean, var)` of training BatchNorm with the gradient of `_bn_train_bwd`.
bn_train = _make_bn_train()
