"""Depthwise convolution on CPU as three C++ kernels (`depthwise_cpu.cc`), with its gradients.

`depthwise(x, kernel, stride, padding)`: NHWC float32 `x`, a `(k, k, 1, C)` kernel, explicit
zero padding `((top, bottom), (left, right))`. The same sums as
`lax.conv_general_dilated(..., feature_group_count=C)` and as the pure-JAX multiply-adds of
`tljax.cpu.depthwise.depthwise_taps`, in the same tap order. XLA:CPU runs those as one fused
pass per tap and the kernel gradient as k*k passes; each kernel here is one pass.

Call it only where `tljax.native.build.available()`; `tljax.cpu.depthwise` decides.
"""

from __future__ import annotations

import jax
import numpy as np

from tljax.native import build


def _attrs(stride: int, padding) -> dict:
    (top, _), (left, _) = padding
    return dict(stride=np.int64(stride), pad_top=np.int64(top), pad_left=np.int64(left))


def _out_size(n: int, k: int, stride: int, pads) -> int:
    return (n + pads[0] + pads[1] - k) // stride + 1


def _forward(x, kernel, stride: int, padding):
    n, h, w, c = x.shape
    k = kernel.shape[0]
    shape = (n, _out_size(h, k, stride, padding[0]), _out_size(w, k, stride, padding[1]), c)
    return build.call("tljax_depthwise_forward", [shape], x, kernel.reshape(k, k, c),
                      **_attrs(stride, padding))[0]


def _forward_fwd(x, kernel, stride, padding):
    return _forward(x, kernel, stride, padding), (x, kernel)


def _backward(stride, padding, res, dy):
    x, kernel = res
    k, c = kernel.shape[0], x.shape[-1]
    dx, = build.call("tljax_depthwise_input_grad", [x.shape], dy, kernel.reshape(k, k, c),
                     **_attrs(stride, padding))
    dk, = build.call("tljax_depthwise_kernel_grad", [(k, k, c)], x, dy,
                     **_attrs(stride, padding))
    return dx, dk.reshape(kernel.shape)


def _check(x, kernel, stride, padding):
    if x.ndim != 4 or kernel.ndim != 4 or kernel.shape[0] != kernel.shape[1] \
            or kernel.shape[2] != 1 or kernel.shape[3] != x.shape[3]:
        raise ValueError(f"depthwise: x must be (N, H, W, C) and kernel (k, k, 1, C), got "
                         f"{x.shape} and {kernel.shape}")
    if x.dtype != np.float32 or kernel.dtype != np.float32:
        raise ValueError(f"depthwise: the CPU kernels take float32, got {x.dtype} and "
                         f"{kernel.dtype}")
    if stride < 1 or any(p < 0 for pair in padding for p in pair):
        raise ValueError(f"depthwise: stride must be >= 1 and padding >= 0, got {stride} and "
                         f"{padding}")


def _make():
    f = jax.custom_vjp(_forward, nondiff_argnums=(2, 3))
    f.defvjp(_forward_fwd, _backward)
    return f


_depthwise = _make()


def depthwise(x, kernel, stride: int, padding):
    """(N, H, W, C) x (k, k, 1, C) -> (N, H', W', C), stride `stride`, zero padding
    `((top, bottom), (left, right))`, differentiable in both arguments."""
    padding = tuple(tuple(int(p) for p in pair) for pair in padding)
    _check(x, kernel, stride, padding)
    return _depthwise(x, kernel, int(stride), padding)
