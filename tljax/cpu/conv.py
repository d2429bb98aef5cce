"""Convolutions on XLA:CPU: 1x1 convolutions as matrix products, larger ones as the C++ direct
convolution.

`conv` takes the ungrouped, undilated NHWC convolutions that `tljax.ops.conv` gives the
engine:
- a 1x1 convolution without padding is a strided slice, then a contraction over channels
  (`pointwise`): XLA:CPU lowers a 1x1 convolution, and above all its kernel gradient, to
  convolution kernels that run several times below its matmul rate. The forward is the C++
  product where it is faster than XLA's dot (`_native_product`); with an epilogue (an
  inference BatchNorm, a residual, an activation) the product applies it to each tile in
  registers (`tljax.native.conv.matmul_bn`);
- a larger float32 kernel with the C++ kernels built: `tljax.native.conv.conv`, the direct
  convolution and kernel gradient (AVX-512), and the input gradient at stride 1 from the
  flipped, transposed kernel;
- anything else: XLA's convolution.
docs/performance.md has the reasons and the measurements.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from tljax import cpu
from tljax.native import conv as native_conv
from tljax.varying import varying_like

# Where the C++ product beats XLA:CPU's dot: a kernel of at most 2**19 floats (2 MiB), or at
# least 2048 rows (docs/performance.md).
_NATIVE_PRODUCT_KERNEL = 2**19
_NATIVE_PRODUCT_ROWS = 2048


def conv(x, kernel, bias, strides, padding, precision, epilogue=None):
    """`(y, fused)`: the convolution of NHWC `x` with HWIO `kernel` (no groups, no dilation),
    plus `bias` (None: none), and whether `epilogue` (a `tljax.ops.Epilogue`) has been applied
    to y. `padding`: 'SAME', 'VALID' or explicit pairs."""
    ks = kernel.shape[:2]
    if isinstance(padding, str):  # the pads XLA would use
        padding = [cpu.same_padding(n, k, s) if padding == "SAME" else (0, 0)
                   for n, k, s in zip(x.shape[1:3], ks, strides, strict=True)]
    if tuple(ks) == (1, 1) and all(tuple(p) == (0, 0) for p in padding):
        x = x[:, ::strides[0], ::strides[1], :]
        if epilogue is not None and _native_product(x, kernel[0, 0]):
            e = epilogue
            k, mean, mul, b, conv_bias = varying_like(x, kernel[0, 0], e.mean, e.mul, e.bias,
                                                      bias)
            return native_conv.matmul_bn(x, k, mean, mul, b, e.act, conv_bias=conv_bias,
                                         residual=e.residual), True
        y = pointwise(x, *varying_like(x, kernel[0, 0]), precision)
    elif x.dtype == jnp.float32 and native_conv.supports(ks, padding) and cpu.native():
        y = native_conv.conv(x, *varying_like(x, kernel), padding, strides, precision)
    else:
        y = jax.lax.conv_general_dilated(x, kernel, strides, padding,
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                         precision=precision)
    return (y if bias is None else y + bias), False


def fuses(activation) -> bool:
    """Whether the C++ product applies `activation` in its epilogue."""
    return activation in native_conv.ACTIVATIONS


def _pointwise(x, kernel, precision):
    """(N, H, W, C) x (C, F) -> (N, H, W, F): the contraction over channels."""
    return _product(x, kernel, precision)


def _native_product(x, kernel) -> bool:
    """Whether `x` (..., C) times `kernel` (C, F) runs the C++ product."""
    rows = x.size // x.shape[-1]
    return (x.dtype == kernel.dtype == jnp.float32 and cpu.direct()
            and (kernel.size <= _NATIVE_PRODUCT_KERNEL or rows >= _NATIVE_PRODUCT_ROWS))


def _product(x, kernel, precision):
    """`x` (..., C) times `kernel` (C, F): the C++ product where it is faster, else XLA's dot."""
    if _native_product(x, kernel):
        return native_conv.matmul(x, kernel)
    return jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())), precision=precision)


def _pointwise_bwd(precision, res, dy):
    """Input gradient dy kernel^T (XLA's dot); kernel gradient x^T dy over the flattened batch
    and space:
    - where F < C, F >= 64 (the reducing 1x1 layers of ResNet and EfficientNet) and the C++
      direct convolution runs: its kernel gradient, which re-reads dy once per 48 input
      channels, cheap when dy is the smaller side (below 64 output channels its tiles run
      partly empty);
    - else the product with the smaller of C and F as its rows: (dy^T x)^T, whose transpose
      the C++ kernels take where F < C (XLA cannot fold it into the product)."""
    x, kernel = res
    dx = jax.lax.dot_general(dy, kernel, (((3,), (1,)), ((), ())), precision=precision)
    c, f = kernel.shape
    if c > f >= 64 and x.ndim == 4 and x.dtype == jnp.float32 and cpu.direct():
        dk = native_conv.kernel_grad(x, dy, kernel[None, None], ((0, 0), (0, 0)))
        return dx, dk[0, 0]
    x2, dy2 = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
    dk_t = jnp.matmul(dy2.T, x2, precision=precision)
    if dy2.shape[1] < x2.shape[1] and dk_t.dtype == jnp.float32 and cpu.native():
        return dx, native_conv.transpose(dk_t)
    return dx, dk_t.T


def _make_pointwise():
    f = jax.custom_vjp(_pointwise, nondiff_argnums=(2,))
    f.defvjp(lambda x, kernel, precision: (_pointwise(x, kernel, precision), (x, kernel)),
             _pointwise_bwd)
    return f


# A 1x1 convolution as the matrix product it is, (N, H, W, C) x (C, F) -> (N, H, W, F), with
# the gradients of `_pointwise_bwd`.
pointwise = _make_pointwise()
