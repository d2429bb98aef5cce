"""The CPU forms of convolutions equal XLA's convolutions: 1x1 convolutions as matrix
products (`layers.Conv`) and depthwise convolutions as shifted multiply-adds
(`layers.DepthwiseConv`), outputs and gradients, with the same parameters."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

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
    dict(features=6, kernel_size=(3, 3), strides=2),  # not 1x1: nn.Conv itself
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
    one_by_one = options["kernel_size"] == (1, 1)
    assert ("conv_general_dilated" in ops) != one_by_one  # on CPU: a matmul, no convolution


@pytest.mark.parametrize("kernel,stride,size", [(3, 1, 9), (3, 2, 9), (5, 2, 10), (5, 1, 6)])
def test_depthwise_conv_equals_grouped_conv(kernel, stride, size):
    x = jax.random.normal(jax.random.key(0), (2, size, size, 5))
    ours = layers.DepthwiseConv(kernel, stride)
    ref = layers.DepthwiseConv(kernel, stride, use_conv=True)
    v = ours.init(jax.random.key(1), x)
    _close(ours.apply(v, x), ref.apply(v, x))
    g_ours = jax.grad(lambda v, x: jnp.sum(jnp.sin(ours.apply(v, x))), argnums=(0, 1))(v, x)
    g_ref = jax.grad(lambda v, x: jnp.sum(jnp.sin(ref.apply(v, x))), argnums=(0, 1))(v, x)
    jax.tree.map(_close, g_ours, g_ref)
