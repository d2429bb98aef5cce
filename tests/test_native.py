"""tljax's C++ CPU kernels (`tljax.native`): the depthwise convolution and its gradients equal
XLA's grouped convolution for any padding, kernel size, stride and channel count; convolutions
(the C++ direct convolution, the flipped and transposed kernel) equal XLA's autodiff, with the
same bits on any number of threads; max pooling equals `reduce_window` and its gradient;
training BatchNorm with its activation equals the formulas (and `tests/test_layers.py`, flax);
the library is built once per machine and reused; without a compiler tljax warns and falls
back to the pure-JAX rewrites with the same numbers; bad arguments get a clear error."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tljax import cpu
from tljax.native import batchnorm as native_batchnorm
from tljax.native import build
from tljax.native import conv as native_conv

pytestmark = pytest.mark.skipif(
    not cpu.native(),
    reason="the native kernels run on CPU, need a C++ compiler and TLJAX_CPU_ENGINE=native")


def _close(a, b, rtol=1e-5):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape
    assert np.abs(a - b).max() <= rtol * max(np.abs(b).max(), 1e-6)


def _grouped(x, kernel, stride, padding):
    return jax.lax.conv_general_dilated(x, kernel, (stride, stride), padding,
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                        feature_group_count=x.shape[-1])


@pytest.mark.parametrize("k,stride,padding,shape", [
    (3, 1, ((1, 1), (1, 1)), (2, 9, 9, 80)),     # channel blocks of 64 and 16
    (3, 2, ((0, 1), (0, 1)), (3, 10, 7, 37)),    # 32, then single channels
    (5, 2, ((2, 2), (1, 3)), (2, 11, 9, 144)),   # B0's 5x5 stride-2 channels
    (5, 1, ((0, 0), (0, 0)), (1, 7, 8, 3)),      # no padding
    (7, 3, ((3, 2), (0, 4)), (2, 13, 12, 16)),
    (4, 2, ((1, 2), (2, 1)), (2, 8, 9, 5)),      # even kernel
    (2, 3, ((0, 1), (1, 0)), (2, 8, 8, 5)),      # kernel smaller than the stride
    (1, 1, ((0, 0), (0, 0)), (2, 4, 4, 5)),
    (3, 1, ((1, 1), (1, 1)), (1, 1, 1, 96)),     # a 1x1 image
])
def test_depthwise_equals_grouped_conv(k, stride, padding, shape):
    from tljax.native import depthwise

    x = jax.random.normal(jax.random.key(0), shape)
    kernel = jax.random.normal(jax.random.key(1), (k, k, 1, shape[-1]))

    def loss(f):
        return lambda x, kernel: jnp.sum(jnp.sin(f(x, kernel)))

    ours = jax.jit(lambda x, kern: depthwise.depthwise(x, kern, stride, padding))
    ref = jax.jit(lambda x, kern: _grouped(x, kern, stride, padding))
    _close(ours(x, kernel), ref(x, kernel))
    jax.tree.map(_close, jax.grad(loss(ours), argnums=(0, 1))(x, kernel),
                 jax.grad(loss(ref), argnums=(0, 1))(x, kernel))
    # Fixed chunks, partial sums added in image order: the same bits on every call.
    np.testing.assert_array_equal(jax.grad(loss(ours), 1)(x, kernel),
                                  jax.grad(loss(ours), 1)(x, kernel))


def test_depthwise_under_vmap():
    from tljax.native import depthwise

    x = jax.random.normal(jax.random.key(0), (3, 2, 6, 6, 4))
    kernel = jax.random.normal(jax.random.key(1), (3, 3, 1, 4))
    pad = ((1, 1), (1, 1))
    got = jax.vmap(lambda x: depthwise.depthwise(x, kernel, 1, pad))(x)
    _close(got, jnp.stack([_grouped(xi, kernel, 1, pad) for xi in x]))


def test_depthwise_refuses_bad_arguments():
    from tljax.native import depthwise

    x = jnp.ones((2, 6, 6, 4))
    with pytest.raises(ValueError, match=r"kernel \(k, k, 1, C\)"):
        depthwise.depthwise(x, jnp.ones((3, 3, 1, 5)), 1, ((1, 1), (1, 1)))
    with pytest.raises(ValueError, match="float32"):
        depthwise.depthwise(x.astype(jnp.bfloat16), jnp.ones((3, 3, 1, 4), jnp.bfloat16), 1,
                            ((1, 1), (1, 1)))
    with pytest.raises(ValueError, match="stride must be >= 1"):
        depthwise.depthwise(x, jnp.ones((3, 3, 1, 4)), 0, ((1, 1), (1, 1)))


@pytest.mark.parametrize("act", [None, jax.nn.relu, jax.nn.silu])
def test_batchnorm_over_many_blocks_equals_the_formulas(act):
    """BatchNorm + activation over 1344 rows (three of the kernels' 512-row blocks, the last
    one short): outputs, statistics and gradients equal the formulas in float64 within 1e-5,
    and two calls give the same bits."""
    from tljax.native import batchnorm

    x = jax.random.normal(jax.random.key(0), (4, 16, 21, 40)) * 2 + 0.5
    scale = 1 + 0.1 * jax.random.normal(jax.random.key(1), (40,))
    bias = 0.1 * jax.random.normal(jax.random.key(2), (40,))
    eps = 1e-3

    def ref(x, scale, bias):
        mean = x.mean((0, 1, 2))
        var = jnp.square(x - mean).mean((0, 1, 2))
        y = (x - mean) * jax.lax.rsqrt(var + eps) * scale + bias
        return (y if act is None else act(y)), mean, var

    def loss(f):
        def g(x, scale, bias):
            y, mean, var = f(x, scale, bias)
            return jnp.sum(jnp.sin(y)) + jnp.sum(mean ** 3) + jnp.sum(var ** 2)
        return jax.jit(jax.value_and_grad(g, argnums=(0, 1, 2)))

    ours = jax.jit(lambda x, s, b: batchnorm.bn_act(x, s, b, eps, act))
    with jax.enable_x64():
        want = [np.asarray(a) for a in ref(*(np.asarray(a, np.float64) for a in (x, scale, bias)))]
        want_grad = loss(ref)(*(np.asarray(a, np.float64) for a in (x, scale, bias)))
    jax.tree.map(_close, list(ours(x, scale, bias)), want)
    got_grad = loss(lambda x, s, b: batchnorm.bn_act(x, s, b, eps, act))(x, scale, bias)
    jax.tree.map(_close, got_grad, want_grad)
    jax.tree.map(np.testing.assert_array_equal, got_grad,
                 loss(lambda x, s, b: batchnorm.bn_act(x, s, b, eps, act))(x, scale, bias))


def test_batchnorm_refuses_bad_arguments():
    from tljax.native import batchnorm

    x, c = jnp.ones((4, 3)), jnp.ones((3,))
    with pytest.raises(ValueError, match="act must be one of"):
        batchnorm.bn_act(x, c, c, 1e-3, jnp.tanh)
    with pytest.raises(ValueError, match="float32"):
        batchnorm.bn_act(x.astype(jnp.bfloat16), c, c, 1e-3)


@pytest.mark.parametrize("shape", [(3, 3, 64, 96), (3, 3, 512, 512), (1, 7, 40, 17),
                                   (2, 5, 9, 33)])
def test_flip_transpose(shape):
    """Whole 32x32 tiles (the AVX 8x8 blocks) and ragged ones."""
    kernel = jax.random.normal(jax.random.key(0), shape)
    np.testing.assert_array_equal(native_conv.flip_transpose(kernel),
                                  jnp.flip(kernel, (0, 1)).swapaxes(2, 3))


@pytest.mark.parametrize("c,f,target", [(96, 40, "tljax_flip_transpose"),
                                         (160, 64, "tljax_conv_kernel_grad")])
def test_pointwise_kernel_grad_of_a_reducing_layer(c, f, target):
    """F < C: the direct kernel gradient where F >= 64 (and AVX-512), else the (F, C) product
    transposed by the C++ kernel; the same values as x^T dy."""
    from tljax.cpu.conv import pointwise
    if target == "tljax_conv_kernel_grad" and not native_conv.direct_available():
        target = "tljax_flip_transpose"
    x = jax.random.normal(jax.random.key(0), (2, 5, 7, c))
    kernel = jax.random.normal(jax.random.key(1), (c, f))
    dy = jax.random.normal(jax.random.key(2), (2, 5, 7, f))
    _, vjp = jax.vjp(lambda k: pointwise(x, k, None), kernel)
    _close(vjp(dy)[0], x.reshape(-1, c).T @ dy.reshape(-1, f))
    assert target in str(jax.make_jaxpr(vjp)(dy))
    np.testing.assert_array_equal(native_conv.transpose(kernel), kernel.T)


@pytest.mark.parametrize("x_shape,f", [
    ((1, 1), 1), ((5, 3), 17), ((2, 5, 7, 24), 144),  # tiles of 5 and 6 rows, ragged vectors
    ((97, 64), 64), ((300, 40), 130),  # 2 blocks of 64 + 2 columns
    ((2, 4, 4, 200), 1000),  # few rows: the columns split between items
    ((2, 17, 13, 70), 64),  # several row items, one with a short last tile
])
def test_matmul_equals_dot(x_shape, f):
    """The C++ product (a 1x1 convolution's forward) equals x @ kernel to float32 rounding,
    for rows that fill whole 6-row tiles or not, columns that fill 1-4 vectors of a 64-column
    panel or leave a ragged one, and splits by rows or by columns."""
    if not native_conv.direct_available():
        pytest.skip("the C++ product needs AVX-512")
    x = jax.random.normal(jax.random.key(0), x_shape)
    kernel = jax.random.normal(jax.random.key(1), (x_shape[-1], f))
    _close(native_conv.matmul(x, kernel), jnp.matmul(x, kernel, precision="highest"))


@pytest.mark.parametrize("act", [None, jax.nn.relu, jax.nn.silu])
@pytest.mark.parametrize("x_shape,f,extras", [((2, 5, 7, 24), 70, False), ((4, 3), 16, False),
                                              ((2, 5, 7, 24), 70, True), ((9, 33), 20, True)])
def test_matmul_bn_equals_the_formula(act, x_shape, f, extras):
    """The product with an inference BatchNorm and its activation applied to each tile in
    registers (the SiLU's exp a 16-lane polynomial), with or without the convolution's bias
    and a residual (`extras`: ResNet's last layer of a block), equals the formula on XLA's
    product, and its gradients are the formula's."""
    if not native_conv.direct_available():
        pytest.skip("the C++ product needs AVX-512")
    keys = jax.random.split(jax.random.key(0), 7)
    x = jax.random.normal(keys[0], x_shape)
    kernel = jax.random.normal(keys[1], (x_shape[-1], f))
    mean, bias = (jax.random.normal(k, (f,)) * 3 for k in keys[2:4])
    mul = jax.random.uniform(keys[4], (f,)) * 2
    conv_bias = jax.random.normal(keys[5], (f,)) if extras else jnp.zeros((f,))
    residual = jax.random.normal(keys[6], x_shape[:-1] + (f,)) * 4 if extras else None

    def ref(x, k, mean, mul, bias, conv_bias, residual):
        y = jnp.matmul(x, k, precision="highest") + conv_bias
        return native_conv.batch_norm_formula(y, mean, mul, bias, act, residual)

    def ours(x, k, mean, mul, bias, conv_bias, residual):
        return native_conv.matmul_bn(x, k, mean, mul, bias, act, conv_bias=conv_bias,
                                     residual=residual)

    args = (x, kernel, mean, mul, bias, conv_bias, residual)
    y, vjp = jax.vjp(ours, *args)
    y_ref, vjp_ref = jax.vjp(ref, *args)
    _close(y, y_ref)
    dy = jax.random.normal(jax.random.key(9), y.shape)
    jax.tree.map(lambda a, b: _close(a, b, 1e-4), vjp(dy), vjp_ref(dy))
    jaxpr = str(jax.make_jaxpr(ours)(*args))
    assert "tljax_matmul_bn" in jaxpr and ("tljax_matmul_bn_add" in jaxpr) == extras
    with pytest.raises(ValueError, match="act must be"):
        native_conv.matmul_bn(x, kernel, mean, mul, bias, jax.nn.gelu)
    with pytest.raises(ValueError, match=rf"float32 \({f},\)"):
        native_conv.matmul_bn(x, kernel, mean[:-1], mul, bias, act)
    with pytest.raises(ValueError, match="residual"):
        native_conv.matmul_bn(x, kernel, mean, mul, bias, act, residual=jnp.ones((1, f)))


def test_pointwise_forward_is_the_cpp_product_where_faster():
    """`tljax.cpu.conv.pointwise` runs the C++ product for a kernel of up to 2**19 floats or
    2048 rows and more, XLA's dot for a larger kernel over fewer rows; both give x @ kernel,
    and the gradients are unchanged."""
    from tljax.cpu.conv import pointwise
    for rows, c, f, native in ((8, 64, 256, True), (8, 1024, 1024, False),
                               (2048, 1024, 1024, True)):
        x = jax.random.normal(jax.random.key(0), (2, rows // 2, 1, c))
        kernel = jax.random.normal(jax.random.key(1), (c, f)) / 32
        y, vjp = jax.vjp(lambda x, k: pointwise(x, k, None), x, kernel)
        _close(y, jnp.matmul(x, kernel, precision="highest"))
        dy = jax.random.normal(jax.random.key(2), y.shape)
        dx, dk = vjp(dy)
        _close(dx, jnp.matmul(dy, kernel.T, precision="highest"))
        _close(dk, jnp.einsum("nhwc,nhwf->cf", x, dy, precision="highest"))
        jaxpr = jax.make_jaxpr(lambda x, k: pointwise(x, k, None))(x, kernel)
        used = "tljax_matmul" in str(jaxpr)
        assert used == (native and native_conv.direct_available())


@pytest.mark.parametrize("x_shape,kernel_shape,padding,strides", [
    # Narrow outputs (< 32 wide): flat tiles, pixels grouped by the taps they meet.
    ((2, 9, 11, 16), (3, 3, 16, 24), ((1, 1), (1, 1)), (1, 1)),
    ((2, 9, 11, 8), (3, 3, 8, 8), ((0, 0), (0, 0)), (1, 1)),  # one class, tiles across images
    ((2, 9, 11, 12), (1, 7, 12, 5), ((0, 0), (3, 3)), (1, 1)),
    ((2, 9, 11, 6), (5, 3, 6, 9), ((0, 4), (2, 1)), (1, 1)),
    ((3, 20, 14, 70), (3, 3, 70, 64), ((1, 1), (1, 1)), (1, 1)),  # a ragged group
    ((2, 13, 19, 3), (3, 3, 3, 70), ((1, 1), (1, 1)), (1, 1)),  # 64 + 6 output channels
    ((2, 16, 17, 33), (5, 5, 33, 17), ((2, 2), (2, 2)), (1, 1)),  # 16 + 1 output channels
    ((4, 16, 16, 8), (7, 1, 8, 130), ((3, 3), (0, 0)), (1, 1)),  # 2 blocks of 64 + 2
    ((2, 12, 25, 9), (3, 3, 9, 16), ((0, 2), (2, 0)), (1, 1)),  # lopsided pads
    ((2, 17, 18, 8), (3, 3, 8, 24), ((1, 1), (1, 1)), (2, 2)),
    ((3, 4, 4, 20), (3, 3, 20, 70), ((1, 1), (1, 1)), (1, 1)),  # ResNet's stage 4: 9 classes
    ((2, 1, 3, 4), (3, 3, 4, 8), ((2, 2), (1, 1)), (2, 1)),  # rows that meet one tap
    # Wide outputs: tiles along rows.
    ((2, 35, 70, 3), (7, 7, 3, 20), ((0, 0), (0, 0)), (2, 2)),  # a stem
    ((2, 30, 100, 5), (3, 5, 5, 16), ((1, 0), (2, 1)), (2, 3)),
    ((2, 6, 40, 24), (3, 3, 24, 80), ((1, 1), (1, 1)), (1, 1)),
])
def test_conv_equals_xla_autodiff(x_shape, kernel_shape, padding, strides):
    """The forward and both gradients equal XLA's autodiff (to float32 rounding: the direct
    convolution sums in its own order), for narrow images (flat tiles) and wide ones (row
    tiles), output channels that fill 1-4 vectors or leave a ragged one, kernel gradients
    summed in one part or several, and strides (XLA's input gradient)."""
    x = jax.random.normal(jax.random.key(0), x_shape)
    kernel = jax.random.normal(jax.random.key(1), kernel_shape)

    def ref(x, k):
        return jax.lax.conv_general_dilated(x, k, strides, padding,
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                            precision="highest")

    def ours(x, k):
        return native_conv.conv(x, k, padding, strides)

    y, vjp = jax.vjp(ref, x, kernel)
    y2, vjp2 = jax.vjp(ours, x, kernel)
    dy = jax.random.normal(jax.random.key(2), y.shape)
    _close(y2, y)
    jax.tree.map(_close, vjp2(dy), vjp(dy))
    assert ("tljax_flip_transpose" in str(jax.make_jaxpr(vjp2)(dy))) == (strides == (1, 1))
    if native_conv.direct_available():
        assert "tljax_conv_kernel_grad" in str(jax.make_jaxpr(vjp2)(dy))
        assert "tljax_conv_forward" in str(jax.make_jaxpr(ours)(x, kernel))


def test_empty_batches_and_channels_give_empty_outputs_and_zero_gradients():
    """No pixels (a batch of 0), no output channels or no input channels: the C++ kernels
    return what XLA does, empty outputs, zero outputs (a sum over no input channels) and zero
    kernel gradients (the direct kernel gradient and the product divided by zero and the
    depthwise kernel gradient read past an empty buffer before)."""
    from tljax.native import depthwise
    for x_shape, kernel_shape in [((0, 8, 8, 4), (3, 3, 4, 8)), ((0, 8, 40, 4), (3, 3, 4, 8)),
                                  ((2, 8, 8, 4), (3, 3, 4, 0)), ((2, 8, 8, 0), (3, 3, 0, 8)),
                                  ((2, 8, 40, 0), (3, 3, 0, 8))]:
        x, k = jnp.ones(x_shape), jnp.ones(kernel_shape)
        y, vjp = jax.vjp(lambda x, k: native_conv.conv(x, k, ((1, 1), (1, 1))), x, k)
        dx, dk = vjp(jnp.ones(y.shape))
        assert dx.shape == x_shape
        np.testing.assert_array_equal(y, np.zeros(x_shape[:3] + kernel_shape[3:]))
        np.testing.assert_array_equal(dk, np.zeros(kernel_shape))
    if native_conv.direct_available():
        assert native_conv.matmul(jnp.ones((0, 4)), jnp.ones((4, 8))).shape == (0, 8)
        assert native_conv.matmul(jnp.ones((5, 4)), jnp.ones((4, 0))).shape == (5, 0)
        np.testing.assert_array_equal(native_conv.matmul(jnp.ones((5, 0)), jnp.ones((0, 70))),
                                      np.zeros((5, 70)))
    for stride in (1, 2):
        x, k = jnp.ones((0, 8, 8, 4)), jnp.ones((3, 3, 1, 4))
        y, vjp = jax.vjp(lambda x, k, s=stride: depthwise.depthwise(x, k, s, ((1, 1), (1, 1))),
                         x, k)
        dx, dk = vjp(jnp.ones(y.shape))
        assert dx.shape == x.shape
        np.testing.assert_array_equal(dk, np.zeros(k.shape))


def test_training_batchnorm_on_an_empty_batch():
    """No rows: the batch statistics are NaN (0 / 0, as flax's), and the gradient is an empty
    dx and zero scale and bias gradients, also through the returned statistics (their
    cotangents divided by the row count, 0: a ZeroDivisionError before)."""
    from tljax.cpu.batchnorm import bn_train
    x, scale, bias = jnp.ones((0, 4)), jnp.ones(4), jnp.zeros(4)
    for bn in (lambda *a: native_batchnorm.bn_act(*a, 1e-3, jax.nn.silu),
               lambda *a: bn_train(*a, 1e-3)):
        y, mean, var = bn(x, scale, bias)
        assert y.shape == (0, 4) and np.isnan(mean).all() and np.isnan(var).all()
        dx, dscale, dbias = jax.grad(lambda *a, bn=bn: sum(v.sum() for v in bn(*a)),
                                     (0, 1, 2))(x, scale, bias)
        assert dx.shape == (0, 4)
        np.testing.assert_array_equal(dscale, np.zeros(4))
        np.testing.assert_array_equal(dbias, np.zeros(4))


@pytest.mark.parametrize("x_shape,kernel_shape,padding,strides", [
    ((2, 20, 14, 16), (3, 3, 16, 24), ((1, 1), (1, 1)), (1, 1)),
    ((2, 35, 37, 3), (7, 7, 3, 20), ((0, 0), (0, 0)), (2, 2)),
])
def test_conv_without_the_direct_kernels_is_xlas_autodiff(monkeypatch, x_shape, kernel_shape,
                                                          padding, strides):
    """A CPU without AVX-512: XLA's forward and kernel gradient, the C++ flipped kernel for the
    stride-1 input gradient: the same ops as XLA's autodiff, so the same bits."""
    monkeypatch.setattr(native_conv, "direct_available", lambda: False)
    x = jax.random.normal(jax.random.key(0), x_shape)
    kernel = jax.random.normal(jax.random.key(1), kernel_shape)

    def ref(x, k):
        return jax.lax.conv_general_dilated(x, k, strides, padding,
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))

    y, vjp = jax.vjp(ref, x, kernel)
    y2, vjp2 = jax.vjp(lambda x, k: native_conv.conv(x, k, padding, strides), x, kernel)
    dy = jax.random.normal(jax.random.key(2), y.shape)
    np.testing.assert_array_equal(y2, y)
    jax.tree.map(np.testing.assert_array_equal, vjp2(dy), vjp(dy))
    assert "tljax_conv_" not in str(jax.make_jaxpr(vjp2)(dy))


def _on_one_cpu_and_on_all(code: str) -> None:
    """Runs `code` (which saves one array to `sys.argv[1]`) in a process pinned to one CPU and
    in one with all of them, and checks the two arrays are the same bits."""
    outs = []
    for cpus in ({min(os.sched_getaffinity(0))}, os.sched_getaffinity(0)):
        path = f"{os.environ.get('TMPDIR', '/tmp')}/tljax_threads_{os.getpid()}_{len(cpus)}.npy"
        subprocess.run([sys.executable, "-c", _PINNED + code, path,
                        ",".join(map(str, sorted(cpus)))], check=True)
        outs.append(np.load(path))
        os.remove(path)
    np.testing.assert_array_equal(outs[0], outs[1])


_PINNED = """
import os, sys
os.sched_setaffinity(0, [int(c) for c in sys.argv[2].split(",")])  # before XLA sizes its pool
import jax, numpy as np
x = jax.random.normal(jax.random.key(0), (6, 30, 28, 40))
"""


def test_max_pool_does_not_depend_on_the_thread_count():
    """Each output element of the C++ max pool and its gradient is summed in a fixed order: the
    same bits on one CPU as on all of them (with AVX-512 or without)."""
    _on_one_cpu_and_on_all("""
from tljax.native import pool
p, vjp = jax.vjp(lambda x: pool.max_pool(x, 3, 2), jax.nn.relu(x))
dp, = vjp(jax.random.normal(jax.random.key(3), p.shape))
np.save(sys.argv[1], np.concatenate([np.ravel(a) for a in (p, dp)]))
""")


def test_direct_conv_and_product_do_not_depend_on_the_thread_count():
    """The same for the direct convolution (the kernel gradient's parts are added in order) and
    the C++ product, which a CPU with AVX-512 has."""
    if not native_conv.direct_available():
        pytest.skip("the direct convolution and the C++ product need AVX-512")
    _on_one_cpu_and_on_all("""
from tljax.native import conv
k = jax.random.normal(jax.random.key(1), (3, 3, 40, 72))
y, vjp = jax.vjp(lambda x, k: conv.conv(x, k, ((1, 1), (1, 1))), x, k)
dx, dk = vjp(jax.random.normal(jax.random.key(2), y.shape))
m = conv.matmul(x, k[0, 0])
np.save(sys.argv[1], np.concatenate([np.ravel(a) for a in (y, dx, dk, m)]))
""")


@pytest.mark.parametrize("shape,window,stride", [((2, 15, 16, 70), 3, 2), ((3, 9, 10, 16), 3, 1),
                                                 ((2, 8, 9, 5), 2, 2), ((1, 7, 7, 33), 5, 3)])
def test_max_pool_equals_reduce_window_and_its_gradient(shape, window, stride):
    """The maxima of `reduce_window` and the gradient of its `select_and_scatter` (each output's
    dy to the first maximum of its window), ties (ReLU zeros) included; NaN propagates."""
    from tljax.native import pool
    x = jax.nn.relu(jax.random.normal(jax.random.key(0), shape))

    def ref(x):
        return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, window, window, 1),
                                     (1, stride, stride, 1), "VALID")

    y, vjp = jax.vjp(ref, x)
    y2, vjp2 = jax.vjp(lambda x: pool.max_pool(x, window, stride), x)
    dy = jax.random.normal(jax.random.key(1), y.shape)
    np.testing.assert_array_equal(y2, y)
    _close(vjp2(dy)[0], vjp(dy)[0], rtol=1e-6)
    assert "tljax_max_pool_backward" in str(jax.make_jaxpr(vjp2)(dy))
    assert np.isnan(np.asarray(pool.max_pool(x.at[0, 0, 0, 0].set(jnp.nan), window, stride))
                    [0, 0, 0, 0])


def test_max_pool_refuses_bad_arguments():
    from tljax.native import pool
    with pytest.raises(ValueError, match="float32"):
        pool.max_pool(jnp.ones((1, 5, 5, 3), jnp.bfloat16), 3, 2)
    with pytest.raises(ValueError, match="at least a window"):
        pool.max_pool(jnp.ones((1, 2, 5, 3)), 3, 2)


def test_conv_refuses_bad_arguments():
    x, kernel = jnp.ones((1, 5, 5, 3)), jnp.ones((3, 3, 3, 4))
    with pytest.raises(ValueError, match="kernel extent"):
        native_conv.conv(x, kernel, ((3, 1), (1, 1)))
    with pytest.raises(ValueError, match="float32"):
        native_conv.conv(x.astype(jnp.bfloat16), kernel, ((1, 1), (1, 1)))
    with pytest.raises(ValueError, match="kernel"):
        native_conv.conv(x, jnp.ones((3, 3, 2, 4)), ((1, 1), (1, 1)))
    with pytest.raises(ValueError, match="strides"):
        native_conv.conv(x, kernel, ((1, 1), (1, 1)), (0, 1))
    with pytest.raises(ValueError, match=r"\(C, F\)"):
        native_conv.matmul(x, jnp.ones((4, 2)))
    with pytest.raises(ValueError, match="float32"):
        native_conv.matmul(x.astype(jnp.bfloat16), jnp.ones((3, 2), jnp.bfloat16))


def test_library_is_built_once_and_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("TLJAX_NATIVE_CACHE", str(tmp_path))
    path = build.build()
    assert path.startswith(str(tmp_path)) and os.path.getsize(path) > 0
    mtime = os.stat(path).st_mtime_ns
    assert build.build() == path and os.stat(path).st_mtime_ns == mtime
    assert [p.name for p in tmp_path.rglob("*") if p.is_file()] == ["libtljax_cpu.so"]


def test_compile_error_names_the_command(tmp_path, monkeypatch):
    bad = tmp_path / "fake-c++"
    bad.write_text("#!/bin/sh\nfor a; do :; done\necho 'fake-c++: no such luck' >&2\n"
                   "[ \"$1\" = --version ] && exit 0\ncase \"$*\" in *-dM*) exit 0;; esac\n"
                   "exit 1\n")
    bad.chmod(0o755)
    monkeypatch.setenv("CXX", str(bad))
    monkeypatch.setenv("TLJAX_NATIVE_CACHE", str(tmp_path / "cache"))
    with pytest.raises(build.BuildError, match="(?s)compiling tljax's CPU kernels failed.*"
                                               "fake-c\\+\\+.*no such luck"):
        build.build()
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]  # no partial file


def test_unwritable_cache_is_a_build_error(tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv("TLJAX_NATIVE_CACHE", str(blocker))
    with pytest.raises(build.BuildError, match="cannot write tljax's kernel cache.*"
                                               "TLJAX_NATIVE_CACHE"):
        build.build()


@pytest.mark.skipif(platform.machine() != "x86_64", reason="x86-64-v3 is an x86 target")
def test_march_builds_the_kernels_for_another_target(tmp_path, monkeypatch):
    """`TLJAX_NATIVE_MARCH=x86-64-v3` builds what a CPU with AVX2 only runs, in a library of its
    own beside the native one: no direct convolution nor product, convolutions that still
    equal XLA's."""
    code = """
import jax, numpy as np
from tljax.native import build, conv
x = jax.random.normal(jax.random.key(0), (2, 9, 9, 8))
k = jax.random.normal(jax.random.key(1), (3, 3, 8, 16))
ref = jax.lax.conv_general_dilated(x, k, (1, 1), ((1, 1), (1, 1)),
                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))
np.testing.assert_allclose(conv.conv(x, k, ((1, 1), (1, 1))), ref, rtol=1e-5, atol=1e-5)
print(build.march(), conv.direct_available(), build.build())
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "TLJAX_NATIVE_CACHE": str(tmp_path),
                                            "TLJAX_NATIVE_MARCH": "x86-64-v3"})
    assert done.returncode == 0, done.stderr[-3000:]
    march, direct, path = done.stdout.split()
    assert (march, direct) == ("x86-64-v3", "False") and path.startswith(str(tmp_path))
    monkeypatch.setenv("TLJAX_NATIVE_CACHE", str(tmp_path))
    monkeypatch.delenv("TLJAX_NATIVE_MARCH", raising=False)
    native = build.build()
    assert os.path.dirname(native) != os.path.dirname(path)  # another key, another library
    assert sorted(p.name for p in tmp_path.rglob("*.so")) == ["libtljax_cpu.so"] * 2


def test_unknown_march_is_a_build_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TLJAX_NATIVE_CACHE", str(tmp_path))
    monkeypatch.setenv("TLJAX_NATIVE_MARCH", "pentium-9000")
    with pytest.raises(build.BuildError, match="(?s)TLJAX_NATIVE_MARCH=pentium-9000 names a "
                                               "target it does not know.*bad value"):
        build.build()


_FALLBACK = """
import warnings, jax, jax.numpy as jnp, numpy as np
from tljax import cpu
from tljax.models import layers
x = jax.random.normal(jax.random.key(0), (2, 9, 9, 5))
layer = layers.DepthwiseConv(3, 2)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    v = layer.init(jax.random.key(1), x)
    jaxpr = str(jax.make_jaxpr(layer.apply)(v, x))
    with cpu.engine_scope("xla"):
        ref = layer.apply(v, x)
    np.testing.assert_allclose(layer.apply(v, x), ref, rtol=1e-5, atol=1e-5)
print("ffi_call" in jaxpr, "|".join(str(w.message) for w in caught))
"""


@pytest.mark.parametrize("env,warns", [
    (dict(CXX="/nonexistent/c++"), True),
    (dict(TLJAX_CPU_ENGINE="jax"), False),
    (dict(TLJAX_NATIVE="0"), False),  # the former name of TLJAX_CPU_ENGINE=jax
])
def test_falls_back_to_pure_jax_layers(tmp_path, env, warns):
    """Without a working compiler the layer warns once, naming the reason, and computes the
    same numbers in pure JAX; `TLJAX_CPU_ENGINE=jax` does so silently."""
    done = subprocess.run([sys.executable, "-c", _FALLBACK], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "TLJAX_NATIVE_CACHE": str(tmp_path),
                                            **env})
    assert done.returncode == 0, done.stderr[-3000:]
    used_native, _, messages = done.stdout.strip().partition(" ")
    assert used_native == "False"
    if warns:
        assert messages.count("falls back") == 1  # once, however many layers
        assert "could not run the C++ compiler '/nonexistent/c++'" in messages
        assert "falls back to its pure-JAX rewrites" in messages
    else:
        assert "C++" not in messages
