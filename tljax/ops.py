"""The operations the layers of `tljax.models.layers` compute, each run by the engine of the
backend.

Each function here states what is computed; which program computes it is decided here and
nowhere else: XLA's own operation on GPUs and TPUs (and on CPU with the `xla` engine), else
the CPU engine (`tljax.cpu`), whose rewrites and C++ kernels give the same numbers. A model
never asks which backend it runs on.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import linen as nn

from tljax import cpu
from tljax.cpu import batchnorm as cpu_batchnorm
from tljax.cpu import conv as cpu_conv
from tljax.cpu import depthwise as cpu_depthwise
from tljax.cpu import pool as cpu_pool
from tljax.native.conv import batch_norm_formula


class Epilogue(NamedTuple):
    """What follows a convolution in `conv(..., epilogue=)`: an inference BatchNorm
    `(y - mean) * mul + bias` (mul = rsqrt(var + eps) * scale, flax's formula in its order),
    then `residual + ` that (where given), then `act` (None: none)."""

    mean: Any
    mul: Any
    bias: Any
    act: Any = None
    residual: Any = None

    def __call__(self, y):
        return batch_norm_formula(y, self.mean, self.mul, self.bias, self.act, self.residual)


def conv(x, kernel, bias, strides, padding, lhs_dilation=(1, 1), rhs_dilation=(1, 1),
         groups: int = 1, precision=None, epilogue: Epilogue | None = None):
    """A 2-D convolution of NHWC `x` with an HWIO `kernel`, as `lax.conv_general_dilated`,
    plus `bias` (None: none), then `epilogue` (None: none). On CPU, the engine may apply the
    epilogue inside the convolution (a 1x1 convolution's product applies it to each tile)."""
    if cpu.rewrites() and groups == 1 and lhs_dilation == rhs_dilation == (1, 1):
        y, fused = cpu_conv.conv(x, kernel, bias, strides, padding, precision, epilogue)
        return y if epilogue is None or fused else epilogue(y)
    y = jax.lax.conv_general_dilated(
        x, kernel, strides, padding, lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=groups,
        precision=precision)
    y = y if bias is None else y + bias
    return y if epilogue is None else epilogue(y)


def fused_epilogue(activation) -> bool:
    """Whether `conv` may apply an epilogue with `activation` inside the convolution: worth
    folding an inference BatchNorm into an `Epilogue` for (`tljax.models.layers.conv_norm`)."""
    return cpu.direct() and cpu_conv.fuses(activation)


def depthwise_conv(x, kernel, stride: int):
    """A depthwise convolution of NHWC `x` with a (k, k, 1, C) `kernel`, TensorFlow's 'SAME'
    padding, no bias: `lax.conv_general_dilated(..., feature_group_count=C)`."""
    if cpu.rewrites():
        return cpu_depthwise.depthwise(x, kernel, stride)
    return jax.lax.conv_general_dilated(
        x, kernel, (stride, stride), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=x.shape[-1])


def max_pool(x, window: int, stride: int):
    """`nn.max_pool(x, (window, window), (stride, stride), 'VALID')`."""
    if cpu.rewrites():
        return cpu_pool.max_pool(x, window, stride)
    return nn.max_pool(x, (window, window), strides=(stride, stride), padding="VALID")


def avg_pool_same(x, window: int):
    """`nn.avg_pool(x, (window, window), (1, 1), 'SAME', count_include_pad=False)`: each output
    the mean of the real (unpadded) pixels of its window, as TensorFlow's 'SAME' average
    pooling; an odd `window`."""
    if window % 2 != 1:
        raise ValueError(f"avg_pool_same takes an odd window, got {window}")
    if cpu.rewrites():
        return cpu_pool.mean_taps(x, window)
    return nn.avg_pool(x, (window, window), strides=(1, 1), padding="SAME",
                       count_include_pad=False)


def batch_norm_train(x, scale, bias, eps: float, activation=None):
    """`(activation(y), mean, var)`: BatchNorm of float32 `x` on its batch statistics over every
    axis but the last, flax's formulas (two-pass variance) in their order, by the CPU engine;
    for where `engine_batch_norm(x)`."""
    return cpu_batchnorm.train(x, scale, bias, eps, activation)


def engine_batch_norm(x) -> bool:
    """Whether `batch_norm_train` computes training BatchNorm of `x`; elsewhere flax's
    BatchNorm does (XLA's operations)."""
    return cpu.rewrites() and x.dtype == jnp.float32
