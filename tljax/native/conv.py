"""Stride-1 convolutions on CPU whose input gradient takes its kernel, flipped in space and
transposed to (KH, KW, O, I), from a C++ kernel (`conv_cpu.cc`).

`conv(x, kernel, padding, precision)`: NHWC float32 `x`, an HWIO `kernel`, explicit zero
padding `((top, bottom), (left, right))`, stride 1; XLA's own convolution forward, XLA's own
kernel gradient, and for the input gradient the convolution of dy with that flipped and
transposed kernel: the same ops as XLA's autodiff, but XLA computes the kernel's reverse +
transpose inside the input gradient at ~2.4 GB/s (3.8 ms for a (3, 3, 512, 512) kernel), and
here it is a tiled copy (0.36-0.48 ms). One (16, 4, 4, 512) 3x3 layer's input gradient:
10.3 -> 6.4 ms; (16, 7, 7, 256): 8.4 -> 4.7 ms (docs/benchmarks.md).

Call it only where `tljax.native.build.available()`; `tljax.models.layers.Conv` decides.
"""

from __future__ import annotations

import functools

import jax
import numpy as np

from tljax.native import build

_DIMENSIONS = ("NHWC", "HWIO", "NHWC")


def flip_transpose(kernel):
    """(KH, KW, I, O) -> (KH, KW, O, I), `out[i, j, o, c] = kernel[KH-1-i, KW-1-j, c, o]`."""
    kh, kw, ci, co = kernel.shape
    return build.call("tljax_flip_transpose", [(kh, kw, co, ci)], kernel)[0]


def transpose(matrix):
    """`matrix.T` for a float32 matrix, as a custom call that XLA cannot fold into the
    product that made `matrix` (`tljax.models.layers.pointwise`)."""
    return flip_transpose(matrix[None, None])[0, 0]


# The direct convolution's forward (and so the input gradient, the same convolution with the
# flipped and transposed kernel) runs as one task per output row with tiles of up to six pixels
# along it; below this output width XLA's convolution is as fast or faster (at 7 and 8 pixels
# wide, 3-30% faster), so it keeps those. The kernel gradient runs over all pixels and is
# faster at every measured shape.
_DIRECT_MIN_WIDTH = 12


@functools.cache
def direct_available() -> bool:
    """Whether the direct convolution is built in: the library was built for a CPU with
    AVX-512. Call only where `build.available()`."""
    return bool(build.library().TljaxDirectConvAvailable())


def _out_size(n, k, pads):
    return n + pads[0] + pads[1] - k + 1


def _conv(x, kernel, padding, precision):
    """The forward: the direct convolution where it is faster, else XLA's."""
    kh, kw = kernel.shape[:2]
    ow = _out_size(x.shape[2], kw, padding[1])
    if ow >= _DIRECT_MIN_WIDTH and direct_available():
        shape = (x.shape[0], _out_size(x.shape[1], kh, padding[0]), ow, kernel.shape[3])
        return build.call("tljax_conv_forward", [shape], x, kernel,
                          pad_top=np.int64(padding[0][0]), pad_left=np.int64(padding[1][0]))[0]
    return jax.lax.conv_general_dilated(x, kernel, (1, 1), padding,
                                        dimension_numbers=_DIMENSIONS, precision=precision)


def _conv_fwd(x, kernel, padding, precision):
    return _conv(x, kernel, padding, precision), (x, kernel)


def _conv_bwd(padding, precision, res, dy):
    x, kernel = res
    kh, kw = kernel.shape[:2]
    (top, bottom), (left, right) = padding
    dx = _conv(dy, flip_transpose(kernel),
               ((kh - 1 - top, kh - 1 - bottom), (kw - 1 - left, kw - 1 - right)), precision)
    if direct_available():
        dk = build.call("tljax_conv_kernel_grad", [kernel.shape], x, dy,
                        pad_top=np.int64(top), pad_left=np.int64(left))[0]
    else:
        dk, = jax.linear_transpose(
            lambda k: jax.lax.conv_general_dilated(x, k, (1, 1), padding,
                                                   dimension_numbers=_DIMENSIONS,
                                                   precision=precision), kernel)(dy)
    return dx, dk


def _make():
    f = jax.custom_vjp(_conv, nondiff_argnums=(2, 3))
    f.defvjp(_conv_fwd, _conv_bwd)
    return f


_conv_vjp = _make()


def supports(kernel_shape, padding) -> bool:
    """Whether `conv` takes a kernel of this shape with this explicit padding: each pad
    between 0 and the kernel's extent - 1 on its axis."""
    return all(0 <= p < k for k, pair in zip(kernel_shape[:2], padding, strict=True)
               for p in pair)


def conv(x, kernel, padding, precision=None):
    """(N, H, W, I) x (KH, KW, I, O) -> (N, H', W', O), stride 1, zero padding
    `((top, bottom), (left, right))`, differentiable in both arguments."""
    padding = tuple(tuple(int(p) for p in pair) for pair in padding)
    if x.ndim != 4 or kernel.ndim != 4 or kernel.shape[2] != x.shape[3]:
        raise ValueError(f"conv: x must be (N, H, W, I) and kernel (KH, KW, I, O), got "
                         f"{x.shape} and {kernel.shape}")
    if x.dtype != np.float32 or kernel.dtype != np.float32:
        raise ValueError(f"conv: the CPU kernels take float32, got {x.dtype} and {kernel.dtype}")
    if not supports(kernel.shape, padding):
        raise ValueError(f"conv: each pad must lie in [0, kernel extent - 1], got {padding} "
                         f"for a {kernel.shape[:2]} kernel")
    return _conv_vjp(x, kernel, padding, precision)
