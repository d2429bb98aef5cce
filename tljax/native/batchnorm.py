"""Training BatchNorm and the activation after it, on CPU, as two C++ kernels
(`batchnorm_cpu.cc`), with its gradient.

`bn_act(x, scale, bias, eps, act)`: float32 `x` (..., C) normalised with its batch statistics
over every axis but the last, as flax's BatchNorm computes them in training (the two-pass
variance), then `act` ('relu', 'silu' or None) applied: `(y, mean, var)`. XLA:CPU writes
x - mean, the normalised value, the sigmoid and the product each as a full-size tensor, and
its backward reads them back; these kernels read x three times and write y once forward, and
read x and dy twice and write dx once backward, recomputing the activation's derivative from
x.

Call it only where `tljax.native.build.available()`; `tljax.cpu.batchnorm` decides.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_derivatives import SymbolicZero

from tljax.native import build

# The activations the kernels apply (and differentiate) themselves, by JAX function.
ACTIVATIONS = {None: 0, jax.nn.relu: 1, jax.nn.silu: 2}


def _bn_act(x, scale, bias, eps: float, act: int):
    c = x.shape[-1]
    y, mean, var = build.call("tljax_batchnorm_forward", (x.shape, (c,), (c,)), x, scale, bias,
                              eps=np.float32(eps), act=np.int64(act))
    return y, mean, var


def _bn_act_fwd(x, scale, bias, eps, act):
    x, scale, bias = x.value, scale.value, bias.value
    y, mean, var = _bn_act(x, scale, bias, eps, act)
    return (y, mean, var), (x, mean, var, scale, bias)


def _bn_act_bwd(eps, act, res, cotangents):
    """dx, dscale, dbias from the kernel, and the cotangents of the returned statistics
    (`add_stats_cotangents`)."""
    x, mean, var, scale, bias = res
    dy, dmean, dvar = cotangents
    if isinstance(dy, SymbolicZero):
        dy = jnp.zeros_like(x)
    c = x.shape[-1]
    dx, dscale, dbias = build.call("tljax_batchnorm_backward", (x.shape, (c,), (c,)),
                                   x, dy, mean, var, scale, bias, eps=np.float32(eps),
                                   act=np.int64(act))
    return add_stats_cotangents(dx, x, mean, dmean, dvar), dscale, dbias


def add_stats_cotangents(dx, x, mean, dmean, dvar):
    """`dx` plus what the cotangents of BatchNorm's returned batch mean and (biased) variance
    contribute, dmean / n and dvar * 2 (x - mean) / n, each skipped when symbolically zero (in
    a train step they only feed the moving averages). Shared by both CPU forms of training
    BatchNorm (`tljax.cpu.batchnorm._bn_train_bwd` too)."""
    n = x.size // x.shape[-1] if x.shape[-1] else 0
    if n == 0:  # no rows (an empty batch): dx is empty, nothing to add (and 1 / n undefined)
        return dx
    if not isinstance(dmean, SymbolicZero):
        dx = dx + dmean / n
    if not isinstance(dvar, SymbolicZero):
        dx = dx + dvar * (2 / n) * (x - mean)
    return dx


def _make():
    f = jax.custom_vjp(_bn_act, nondiff_argnums=(3, 4))
    f.defvjp(_bn_act_fwd, _bn_act_bwd, symbolic_zeros=True)
    return f


_bn_act_vjp = _make()


def bn_act(x, scale, bias, eps: float, act=None):
    """`(act(BatchNorm(x)), mean, var)` on the batch's statistics; `scale` may be None (no
    learned scale), `act` one of `ACTIVATIONS`. Differentiable in x, scale and bias."""
    if act not in ACTIVATIONS:
        raise ValueError(f"bn_act: act must be one of {list(ACTIVATIONS)}, got {act!r}")
    if x.dtype != jnp.float32:
        raise ValueError(f"bn_act: the CPU kernels take float32, got {x.dtype}")
    if scale is None:
        scale = jnp.ones_like(bias)
    return _bn_act_vjp(x, scale, bias, float(eps), ACTIVATIONS[act])
