"""The layers on the CPU engine (`tljax.cpu`) equal XLA's operations: 1x1 convolutions as
matrix products (`layers.Conv`) and depthwise convolutions as C++ kernels or shifted
multiply-adds (`layers.DepthwiseConv`), max pooling as shifted maxima (`layers.max_pool`) and
average pooling as shifted sums (`layers.avg_pool_same`), and training BatchNorm with its
hand-written gradient (`layers.BatchNorm`), outputs and gradients, with the same parameters."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tljax import cpu
from tljax.models import layers


def _close(a, b, rtol=1e-5):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape
    assert np.abs(a - b).max() <= rtol * max(np.abs(b).max(), 1e-6)


@pytest.mark.parametrize("options", [
    dict(features=6, kernel_size=(1, 1)),
    dict(features=6, kernel_size=(1, 1), strides=(2, 2), padding="SAME"),
    dict(features=6, kernel_size=(1, 1), strides=2, padding="VALID", use_bias=False),
    dict(features=6, kernel_size=(1, 1), padding=((0, 0), (0, 0))),
    dict(features=6, kernel_size=(3, 3), strides=2),  # tljax.native.conv when built
    dict(features=6, kernel_size=(3, 3)),
    dict(features=5, kernel_size=(1, 7), padding="VALID", use_bias=False),
    dict(features=4, kernel_size=(3, 5), padding=((0, 2), (1, 3))),
    dict(features=6, kernel_size=(3, 3), padding=((3, 3), (1, 1))),  # pad > k - 1: XLA's
    dict(features=6, kernel_size=(3, 3), kernel_dilation=2),
    dict(features=8, kernel_size=(3, 3), feature_group_count=2),
    dict(features=6, kernel_size=3),  # an int: a 1-D convolution over W, nn.Conv's own
])
def test_conv_equals_flax_conv(options):
    x = jax.random.normal(jax.random.key(0), (2, 9, 7, 8))
    ours, ref = layers.Conv(**options), nn.Conv(**options)
    v = ref.init(jax.random.key(1), x)
    jax.tree.map(np.testing.assert_array_equal, layers.Conv(**options).init(jax.random.key(1), x),
                 v)  # the same parameters, initialised the same way

    def loss(module):
        return lambda v, x: jnp.sum(jnp.sin(module.apply(v, x)))

    _close(ours.apply(v, x), ref.apply(v, x))
    g_ours = jax.grad(loss(ours), argnums=(0, 1))(v, x)
    g_ref = jax.grad(loss(ref), argnums=(0, 1))(v, x)
    jax.tree.map(_close, g_ours, g_ref)
    ops = str(jax.make_jaxpr(lambda v, x: ours.apply(v, x))(v, x))
    if options["kernel_size"] == (1, 1):  # on CPU: a matmul, no convolution
        assert "conv_general_dilated" not in ops
    else:  # XLA's convolution, or the C++ one (tests/test_native.py says which where)
        assert "conv_general_dilated" in ops or "tljax_conv_forward" in ops


@pytest.mark.parametrize("kernel,stride,size,batch", [
    (3, 1, 9, 2), (3, 2, 9, 2), (3, 2, 8, 2), (5, 2, 10, 2), (5, 2, 7, 2), (5, 1, 6, 2),
    (5, 1, 4, 2), (3, 2, (8, 11), 3), (5, 2, (7, 4), 17), (3, 1, (5, 6), 20), (2, 3, 8, 2),
    (1, 2, 5, 2)])
@pytest.mark.parametrize("form", ["native", "taps"])
def test_depthwise_conv_equals_grouped_conv(kernel, stride, size, batch, form, monkeypatch):
    """Forward and both gradients equal XLA's grouped convolution, in both CPU forms: the C++
    kernels (`tljax.native.depthwise`, the default) and the pure-JAX multiply-adds
    (`TLJAX_CPU_ENGINE=jax`, or no compiler). Odd and even, square and not, strides 1-3 (the taps'
    gradients are computed phase by phase, k < s included) and batches that the taps' kernel
    gradient (`_tap_sums`, up to 16 slices) splits unevenly or not at all (17 is prime)."""
    from tljax.native import build

    monkeypatch.setenv("TLJAX_CPU_ENGINE", "native" if form == "native" else "jax")
    if form == "native" and not build.available():
        pytest.skip("no C++ compiler: the native kernels are not built")
    h, w = (size, size) if isinstance(size, int) else size
    x = jax.random.normal(jax.random.key(0), (batch, h, w, 5))
    ours = layers.DepthwiseConv(kernel, stride)
    v = ours.init(jax.random.key(1), x)
    assert ("ffi_call" in str(jax.make_jaxpr(ours.apply)(v, x))) == (form == "native")
    g_ours = jax.grad(lambda v, x: jnp.sum(jnp.sin(ours.apply(v, x))), argnums=(0, 1))(v, x)
    with cpu.engine_scope("xla"):  # the reference: XLA's grouped convolution
        ref = layers.DepthwiseConv(kernel, stride)
        assert "feature_group_count" in str(jax.make_jaxpr(ref.apply)(v, x))
        y_ref = ref.apply(v, x)
        g_ref = jax.grad(lambda v, x: jnp.sum(jnp.sin(ref.apply(v, x))), argnums=(0, 1))(v, x)
    _close(ours.apply(v, x), y_ref)
    jax.tree.map(_close, g_ours, g_ref)


@pytest.mark.parametrize("window, stride, shape", [
    (3, 2, (2, 9, 9, 3)), (3, 2, (2, 11, 10, 4)), (2, 2, (2, 8, 8, 3)), (3, 1, (2, 7, 7, 2))])
def test_max_pool_equals_flax_max_pool_ties_included(window, stride, shape):
    """`layers.max_pool` (shifted maxima on CPU) gives flax's maxima and sends each gradient to
    the same input as `reduce_window`'s gradient, also where a window holds several maxima:
    zeros after a ReLU, and a block of equal positive values. Integer cotangents make the
    sums exact, so the comparison is exact."""
    rng = np.random.default_rng(0)
    x = np.maximum(rng.normal(size=shape), 0).astype(np.float32)
    x[0, :3, :3, 0] = 1.0
    x = jnp.asarray(x)

    def ref(x):
        return nn.max_pool(x, (window, window), strides=(stride, stride), padding="VALID")

    def ours(x):
        return layers.max_pool(x, window, stride)

    y = ref(x)
    np.testing.assert_array_equal(ours(x), y)
    dy = jnp.asarray(rng.integers(1, 50, y.shape).astype(np.float32))
    np.testing.assert_array_equal(jax.vjp(ours, x)[1](dy)[0], jax.vjp(ref, x)[1](dy)[0])
    assert "reduce_window_max" not in str(jax.make_jaxpr(ours)(x))
    with cpu.engine_scope("xla"):  # a new function: JAX caches traces by function
        assert "reduce_window_max" in str(jax.make_jaxpr(lambda x: ours(x))(x))


@pytest.mark.parametrize("window, shape", [(3, (2, 9, 9, 3)), (3, (2, 5, 8, 4)), (5, (1, 7, 6, 2))])
def test_avg_pool_same_equals_flax_avg_pool(window, shape):
    """`layers.avg_pool_same` (shifted sums on CPU): flax's 'SAME' average pooling without the
    pad, outputs and input gradients."""
    x = jax.random.normal(jax.random.key(0), shape)

    def ref(x):
        return nn.avg_pool(x, (window, window), strides=(1, 1), padding="SAME",
                           count_include_pad=False)

    def ours(x):
        return layers.avg_pool_same(x, window)

    _close(ours(x), ref(x), 1e-6)
    dy = jax.random.normal(jax.random.key(1), shape)
    _close(jax.vjp(ours, x)[1](dy)[0], jax.vjp(ref, x)[1](dy)[0], 1e-6)
    assert "reduce_window" not in str(jax.make_jaxpr(ours)(x))
    with pytest.raises(ValueError, match="odd window"):
        layers.avg_pool_same(x, 2)


@pytest.mark.parametrize("form", ["native", "xla"])
@pytest.mark.parametrize("use_scale, shape, activation", [
    (True, (4, 5, 6, 7), None), (False, (4, 5, 6, 7), None), (True, (6, 3), None),
    (True, (4, 5, 6, 7), nn.relu), (False, (2, 3, 4, 19), nn.swish),
    (True, (2, 3, 4, 5), lambda y: jnp.minimum(nn.relu(y), 6.0)),  # not fused: applied after
])
def test_training_batchnorm_equals_flax(use_scale, shape, activation, form, monkeypatch):
    """`layers.BatchNorm` in training mode on CPU, followed by its activation: flax's BatchNorm
    then the activation, its moving averages, and its gradients with respect to the input and
    the parameters; also when a loss differentiates the batch statistics themselves. In both
    CPU forms: the C++ kernels with ReLU or SiLU fused (`tljax.native.batchnorm`, statistics
    summed in another order: within 1e-5) and the hand-written gradient (`bn_train`,
    `TLJAX_CPU_ENGINE=jax`: flax's outputs exactly)."""
    from tljax.native import build

    monkeypatch.setenv("TLJAX_CPU_ENGINE", "native" if form == "native" else "jax")
    if form == "native" and not build.available():
        pytest.skip("no C++ compiler: the native kernels are not built")
    x = jax.random.normal(jax.random.key(0), shape) * 3 + 1
    opts = dict(momentum=0.9, epsilon=1e-3, use_scale=use_scale, use_fast_variance=False)
    ours = layers.BatchNorm(use_running_average=None, training=True, activation=activation,
                            **opts)
    flax_bn = nn.BatchNorm(use_running_average=False, **opts)
    act = activation or (lambda y: y)

    class Ref(nn.Module):
        @nn.compact
        def __call__(self, x):
            return act(nn.BatchNorm(use_running_average=False, name="bn", **opts)(x))

    v = flax_bn.init(jax.random.key(1), x)
    jax.tree.map(np.testing.assert_array_equal, ours.init(jax.random.key(1), x), v)
    v = jax.tree.map(lambda a: a + 0.1 * jax.random.normal(jax.random.key(2), a.shape), v)

    def ref_apply(v, x, **kw):
        out, new = Ref().apply({k: {"bn": val} for k, val in v.items()}, x, **kw)
        return out, {k: val["bn"] for k, val in new.items()}

    def loss(apply):
        def f(params, x):
            y, new = apply({"params": params, "batch_stats": v["batch_stats"]}, x,
                           mutable=["batch_stats"])
            return jnp.sum(jnp.sin(y)), new
        return jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))

    (l_ours, stats_ours), g_ours = loss(ours.apply)(v["params"], x)
    (l_ref, stats_ref), g_ref = loss(ref_apply)(v["params"], x)
    y_ours = ours.apply(v, x, mutable=["batch_stats"])[0]
    y_ref = ref_apply(v, x, mutable=["batch_stats"])[0]
    if form == "xla":
        np.testing.assert_array_equal(y_ours, y_ref)
    else:
        _close(y_ours, y_ref)
    _close(l_ours, l_ref)
    jax.tree.map(_close, (stats_ours, g_ours), (stats_ref, g_ref))
    jaxpr = str(jax.make_jaxpr(lambda x: ours.apply(v, x, mutable=True))(x))
    assert ("ffi_call" if form == "native" else "bn_train") in jaxpr

    def through_stats(apply):
        def f(x):
            s = apply(v, x, mutable=["batch_stats"])[1]["batch_stats"]
            return jnp.sum(s["var"] ** 2) + jnp.sum(s["mean"] ** 3)
        return jax.grad(f)(x)

    _close(through_stats(ours.apply), through_stats(ref_apply))


class _ConvBN(nn.Module):
    """A convolution and a BatchNorm with its activation, through `layers.conv_norm` (ours) or
    flax's modules one after the other (ref), with the same parameter paths; with `residual`,
    ResNet's last layer of a block: a conv with a bias, the BatchNorm, the block's input (its
    first 24 channels) added, then the activation."""
    kernel: tuple
    activation: object
    ours: bool = True
    training: bool = False
    residual: bool = False

    @nn.compact
    def __call__(self, x):
        opts = dict(epsilon=1e-3, use_fast_variance=False, name="bn")
        res = x[..., :24] * 2 if self.residual else None
        if self.ours:
            conv = layers.Conv(24, self.kernel, use_bias=self.residual, name="conv")
            norm = layers.BatchNorm(use_running_average=None, training=self.training,
                                    activation=None if self.residual else self.activation,
                                    **opts)
            if self.residual:
                return layers.conv_norm(conv, norm, x, shortcut=res,
                                        activation=self.activation)
            return layers.conv_norm(conv, norm, x)
        y = nn.Conv(24, self.kernel, use_bias=self.residual, name="conv")(x)
        y = nn.BatchNorm(use_running_average=not self.training, **opts)(y)
        if self.residual:
            y = res + y
        return y if self.activation is None else self.activation(y)


def _relu6(x):
    return jnp.minimum(jax.nn.relu(x), 6.0)


@pytest.mark.parametrize("kernel,activation,training,residual,fused", [
    ((1, 1), jax.nn.silu, False, False, True),  # EfficientNet's expand and top layers
    ((1, 1), None, False, False, True),  # its project layers
    ((1, 1), jax.nn.relu, False, False, True),
    ((1, 1), jax.nn.relu, False, True, True),  # ResNet's conv3, bn3, shortcut add, ReLU
    ((1, 1), _relu6, False, True, True),  # an activation the epilogue lacks: after it
    ((1, 1), _relu6, False, False, False),  # EfficientNet-Lite's: not folded
    ((3, 3), jax.nn.silu, False, False, False),  # not a 1x1: the formula after the conv
    ((3, 3), jax.nn.relu, False, True, False),
    ((1, 1), jax.nn.silu, True, False, False),  # training BatchNorm: not folded
    ((1, 1), jax.nn.relu, True, True, False),
])
def test_conv_norm_equals_conv_then_batchnorm(kernel, activation, training, residual, fused):
    """`layers.conv_norm` folds an inference BatchNorm, a residual and an activation into the
    C++ product of a 1x1 convolution (on CPU with AVX-512); everywhere its outputs, variables
    and gradients are flax's convolution, then BatchNorm, then the add and the activation."""

    x = jax.random.normal(jax.random.key(0), (2, 9, 7, 40))
    ours, ref = (_ConvBN(kernel, activation, o, training, residual) for o in (True, False))
    v = ref.init(jax.random.key(1), x)
    jax.tree.map(np.testing.assert_array_equal, ours.init(jax.random.key(1), x), v)
    v = jax.tree.map(lambda a: a + jax.random.uniform(jax.random.key(2), a.shape), v)

    def loss(module):
        def f(params, x):
            y = module.apply({"params": params, "batch_stats": v["batch_stats"]}, x,
                             mutable=["batch_stats"])[0]
            return jnp.sum(jnp.sin(y)), y
        return jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))

    (l_ours, y_ours), g_ours = loss(ours)(v["params"], x)
    (l_ref, y_ref), g_ref = loss(ref)(v["params"], x)
    _close(y_ours, y_ref)
    # Against the gradients' own scale: a training BatchNorm leaves the conv bias a gradient
    # of zero up to rounding, which no relative tolerance of its own can compare.
    scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(g_ref))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * scale),
                 g_ours, g_ref)
    jaxpr = str(jax.make_jaxpr(lambda x: ours.apply(v, x, mutable=True))(x))
    assert ("tljax_matmul_bn" in jaxpr) == (fused and cpu.direct())


def test_conv_norm_wants_the_activation_after_the_shortcut():
    class M(nn.Module):
        @nn.compact
        def __call__(self, x):
            return layers.conv_norm(layers.Conv(4, (1, 1)),
                                    layers.BatchNorm(use_running_average=None,
                                                     activation=jax.nn.relu), x, shortcut=x)

    with pytest.raises(ValueError, match="after the add"):
        M().init(jax.random.key(0), jnp.ones((1, 2, 2, 4)))


def test_xla_engine_turns_the_cpu_rewrites_off():
    """Inside `cpu.engine_scope("xla")` a model traces with XLA's convolution ops, as on
    accelerators (the benchmark counts model FLOPs on that form); outside, the CPU forms."""
    from tljax import models

    m = models.create("efficientnet_b0", num_classes=3)
    v = models.random_variables(m, 32)
    x = jnp.zeros((1, 32, 32, 3))

    def convs(jaxpr):
        eqns = [e for e in jaxpr.eqns if e.primitive.name == "conv_general_dilated"]
        for e in jaxpr.eqns:
            for sub in jax.extend.core.jaxprs_in_params(e.params):
                eqns += convs(sub)
        return eqns

    def trace():
        return jax.make_jaxpr(lambda v, x: m.apply(v, x, train=False))(v, x).jaxpr

    assert cpu.rewrites() == (jax.default_backend() == "cpu")
    with cpu.engine_scope("xla"):
        assert not cpu.rewrites()
        plain = convs(trace())
    grouped = [e for e in plain if e.params["feature_group_count"] > 1]
    assert len(grouped) == 16  # B0's 16 depthwise convolutions
    assert any(e.invars[1].aval.shape[:2] == (1, 1) for e in plain)  # 1x1 as convolutions
    if jax.default_backend() == "cpu":
        rewritten = convs(trace())
        assert all(e.params["feature_group_count"] == 1 for e in rewritten)
        assert all(e.invars[1].aval.shape[:2] != (1, 1) for e in rewritten)
        assert len(rewritten) < len(plain)
