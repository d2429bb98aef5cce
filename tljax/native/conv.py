"""Convolutions on CPU from C++ kernels (`conv_cpu.cc`), for `tljax.cpu.conv`.

`conv(x, kernel, padding, strides, precision)`: NHWC float32 `x`, an HWIO `kernel`, explicit
zero padding `((top, bottom), (left, right))`, differentiable in both arguments:
- the forward is the direct convolution (AVX-512 register tiles of up to 6 output pixels x
  64 output channels: along a row, or where rows are narrow, pixels anywhere in the batch
  that meet the same taps, so that the padding's are skipped) where the library was built
  for a CPU with AVX-512; else XLA's convolution;
- the input gradient, at stride 1, is that same forward on dy with the kernel flipped in space
  and transposed to (KH, KW, O, I) by a C++ tiled copy (XLA computes that kernel inside its
  input gradient at a fraction of the memory bandwidth); strided, it is XLA's transpose of
  its convolution;
- the kernel gradient is the direct kernel gradient (tiles of 6 input x 64 output channels,
  summed over chunks of ~256 pixels), else XLA's.
`matmul(x, kernel)`: a 1x1 convolution's forward, x (..., C) times kernel (C, F), in the same
register tiles over the rows, each tile reading the kernel's rows in place (64 columns);
`matmul_bn` applies the conv bias, an inference BatchNorm, a residual and an activation (the
training BatchNorm kernels' `ACTIVATIONS`, same codes) to each tile before it is stored.
`kernel_grad` also serves 1x1 convolutions (`tljax.cpu.conv.pointwise`).
docs/performance.md says how they compare with XLA:CPU's convolutions.

Call it only where `tljax.native.build.available()`; `tljax.cpu.conv` decides.
"""

from __future__ import annotations

import functools

import jax
import numpy as np

from tljax.native import build
from tljax.native.batchnorm import ACTIVATIONS

_DIMENSIONS = ("NHWC", "HWIO", "NHWC")


def flip_transpose(kernel):
    """(KH, KW, I, O) -> (KH, KW, O, I), `out[i, j, o, c] = kernel[KH-1-i, KW-1-j, c, o]`."""
    kh, kw, ci, co = kernel.shape
    return build.call("tljax_flip_transpose", [(kh, kw, co, ci)], kernel)[0]


def transpose(matrix):
    """`matrix.T` for a float32 matrix, as a custom call that XLA cannot fold into the
    product that made `matrix` (`tljax.cpu.conv.pointwise`)."""
    return flip_transpose(matrix[None, None])[0, 0]


def direct_available() -> bool:
    """Whether the C++ kernels are built (`build.available()`) with the direct convolution
    and product: for a CPU with AVX-512."""
    return build.available() and direct_built()


@functools.cache
def direct_built() -> bool:
    """Whether the built library has the direct convolution and product (AVX-512); call
    where `build.available()`."""
    return bool(build.library().TljaxDirectConvAvailable())


def _out_size(n, k, pads, s):
    return (n + pads[0] + pads[1] - k) // s + 1


def _xla_conv(x, kernel, padding, strides, precision):
    return jax.lax.conv_general_dilated(x, kernel, strides, padding,
                                        dimension_numbers=_DIMENSIONS, precision=precision)


def _attributes(padding, strides):
    return dict(pad_top=np.int64(padding[0][0]), pad_left=np.int64(padding[1][0]),
                stride_h=np.int64(strides[0]), stride_w=np.int64(strides[1]))


def forward(x, kernel, padding, strides=(1, 1), precision=None):
    """The convolution: the direct one where the library has it, else XLA's."""
    kh, kw = kernel.shape[:2]
    if direct_available():
        shape = (x.shape[0], _out_size(x.shape[1], kh, padding[0], strides[0]),
                 _out_size(x.shape[2], kw, padding[1], strides[1]), kernel.shape[3])
        return build.call("tljax_conv_forward", [shape], x, kernel,
                          **_attributes(padding, strides))[0]
    return _xla_conv(x, kernel, padding, strides, precision)


def matmul(x, kernel):
    """`x @ kernel` for float32 x (..., C) and kernel (C, F): the C++ product in register
    tiles of 6 rows x 64 columns (a 1x1 convolution's forward). Call only where
    `direct_available()`."""
    _check_matmul(x, kernel)
    return build.call("tljax_matmul", [x.shape[:-1] + kernel.shape[1:]], x, kernel)[0]


def _check_matmul(x, kernel):
    if x.ndim < 1 or kernel.ndim != 2 or x.shape[-1] != kernel.shape[0]:
        raise ValueError(f"matmul: x must be (..., C) and kernel (C, F), got {x.shape} and "
                         f"{kernel.shape}")
    if x.dtype != np.float32 or kernel.dtype != np.float32:
        raise ValueError(f"matmul: the CPU kernel takes float32, got {x.dtype} and "
                         f"{kernel.dtype}")


def batch_norm_formula(y, mean, mul, bias, act, residual=None):
    """flax's inference BatchNorm, `(y - mean) * mul + bias` with mul = rsqrt(var + eps) *
    scale, in its order, then `residual +` that (where given) and `act` (None: none)."""
    y = (y - mean) * mul + bias
    if residual is not None:
        y = residual + y
    return y if act is None else act(y)


def _matmul_bn(x, kernel, conv_bias, mean, mul, bias, residual, act):
    args = (x, kernel, conv_bias, mean, mul, bias) + (() if residual is None else (residual,))
    target = "tljax_matmul_bn" if residual is None else "tljax_matmul_bn_add"
    return build.call(target, [x.shape[:-1] + kernel.shape[1:]], *args,
                      act=np.int64(ACTIVATIONS[act]))[0]


def _matmul_bn_fwd(x, kernel, conv_bias, mean, mul, bias, residual, act):
    out = _matmul_bn(x, kernel, conv_bias, mean, mul, bias, residual, act)
    return out, (x, kernel, conv_bias, mean, mul, bias, residual)


def _reference(x, kernel, conv_bias, mean, mul, bias, residual, act):
    y = jax.numpy.matmul(x, kernel) + conv_bias
    return batch_norm_formula(y, mean, mul, bias, act, residual)


def _matmul_bn_bwd(act, res, dy):
    """The gradient of the same formula in JAX (XLA's product), which recomputes the product:
    a frozen BatchNorm is differentiated only where a layer below it trains."""
    *args, residual = res
    if residual is None:
        grads = jax.vjp(lambda *a: _reference(*a, None, act), *args)[1](dy)
        return (*grads, None)
    return jax.vjp(lambda *a: _reference(*a, act), *args, residual)[1](dy)


_matmul_bn_vjp = jax.custom_vjp(_matmul_bn, nondiff_argnums=(7,))
_matmul_bn_vjp.defvjp(_matmul_bn_fwd, _matmul_bn_bwd)


def matmul_bn(x, kernel, mean, mul, bias, act=None, *, conv_bias=None, residual=None):
    """`batch_norm_formula(x @ kernel + conv_bias, mean, mul, bias, act, residual)` with the
    convolution's bias (where given), the BatchNorm, the residual (where given, shaped as the
    output) and `act` (one of `ACTIVATIONS`) applied to each tile of the C++ product
    in registers, before it is stored, instead of in passes over the product; differentiable.
    Call only where `direct_available()`."""
    if act not in ACTIVATIONS:
        raise ValueError(f"matmul_bn: act must be one of {list(ACTIVATIONS)}, got "
                         f"{act!r}")
    _check_matmul(x, kernel)
    f = kernel.shape[-1]
    if conv_bias is None:
        conv_bias = jax.numpy.zeros((f,), np.float32)
    if any(v.shape != (f,) or v.dtype != np.float32 for v in (conv_bias, mean, mul, bias)):
        raise ValueError(f"matmul_bn: conv_bias, mean, mul and bias must be float32 ({f},), got "
                         f"{[(v.shape, v.dtype) for v in (conv_bias, mean, mul, bias)]}")
    out_shape = x.shape[:-1] + (f,)
    if residual is not None and (residual.shape != out_shape or residual.dtype != np.float32):
        raise ValueError(f"matmul_bn: the residual must be float32 {out_shape}, got "
                         f"{residual.shape} {residual.dtype}")
    return _matmul_bn_vjp(x, kernel, conv_bias, mean, mul, bias, residual, act)


def kernel_grad(x, dy, kernel, padding, strides=(1, 1), precision=None):
    """The gradient of `forward(x, kernel, ...)` with respect to `kernel`, given the output's
    gradient dy. `kernel` gives the result's shape and, inside `jax.shard_map(check_vma=True)`,
    the devices it varies along, those of `x` (the layers cast it so: `varying_like`):
    transposed against a bare shape, XLA's convolution would sum the gradient over the devices
    itself (and fail the custom gradient's type check)."""
    if direct_available():
        return build.call("tljax_conv_kernel_grad", [kernel.shape], x, dy,
                          **_attributes(padding, strides))[0]
    dk, = jax.linear_transpose(lambda k: _xla_conv(x, k, padding, strides, precision),
                               kernel)(dy)
    return dk


def _conv_fwd(x, kernel, padding, strides, precision):
    return forward(x, kernel, padding, strides, precision), (x, kernel)


def _conv_bwd(padding, strides, precision, res, dy):
    x, kernel = res
    kh, kw = kernel.shape[:2]
    (top, bottom), (left, right) = padding
    if strides == (1, 1):
        dx = forward(dy, flip_transpose(kernel),
                     ((kh - 1 - top, kh - 1 - bottom), (kw - 1 - left, kw - 1 - right)),
                     precision=precision)
    else:
        dx, = jax.linear_transpose(
            lambda x: _xla_conv(x, kernel, padding, strides, precision), x)(dy)
    return dx, kernel_grad(x, dy, kernel, padding, strides, precision)


def _make():
    f = jax.custom_vjp(forward, nondiff_argnums=(2, 3, 4))
    f.defvjp(_conv_fwd, _conv_bwd)
    return f


_conv_vjp = _make()


def supports(kernel_shape, padding) -> bool:
    """Whether `conv` takes a kernel of this shape with this explicit padding: each pad
    between 0 and the kernel's extent - 1 on its axis."""
    return all(0 <= p < k for k, pair in zip(kernel_shape[:2], padding, strict=True)
               for p in pair)


def conv(x, kernel, padding, strides=(1, 1), precision=None):
    """(N, H, W, I) x (KH, KW, I, O) -> (N, H', W', O), zero padding
    `((top, bottom), (left, right))`, `strides` (rows, columns), differentiable in both
    arguments."""
    padding = tuple(tuple(int(p) for p in pair) for pair in padding)
    strides = tuple(int(s) for s in strides)
    if x.ndim != 4 or kernel.ndim != 4 or kernel.shape[2] != x.shape[3]:
        raise ValueError(f"conv: x must be (N, H, W, I) and kernel (KH, KW, I, O), got "
                         f"{x.shape} and {kernel.shape}")
    if x.dtype != np.float32 or kernel.dtype != np.float32:
        raise ValueError(f"conv: the CPU kernels take float32, got {x.dtype} and {kernel.dtype}")
    if not supports(kernel.shape, padding):
        raise ValueError(f"conv: each pad must lie in [0, kernel extent - 1], got {padding} "
                         f"for a {kernel.shape[:2]} kernel")
    if len(strides) != 2 or min(strides) < 1:
        raise ValueError(f"conv: strides must be two integers >= 1, got {strides}")
    return _conv_vjp(x, kernel, padding, strides, precision)
