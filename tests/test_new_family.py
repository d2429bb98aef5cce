"""A new architecture added through the documented contract alone (docs/adding_a_model.md): a
toy family defined in this file, registered with `tljax.models.register`, converts from a
Keras file to the same outputs, freezes by preset and trains three steps, with no other file
of tljax knowing it."""

from __future__ import annotations

import functools
import os
from typing import Any

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import pytest  # noqa: E402
from flax import linen as nn  # noqa: E402
from flax import traverse_util  # noqa: E402

from tljax import freeze, models, weights  # noqa: E402
from tljax import train_step as steps  # noqa: E402
from tljax.models import layers  # noqa: E402
from tljax.models.family import Family  # noqa: E402

# ------------------------------------------------------------------ the family's own file

NUMERICS = layers.Numerics(bn_epsilon=1e-3, bn_momentum=0.99, bn_scale=True,
                           preprocessing="tf")
FAMILY = Family("toynet", units=("stem", r"block\d+", "head"), blocks=r"block\d+")
WIDTHS = (8, 12, 16)


class ConvBNReLU(nn.Module):
    features: int
    stride: int = 1
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train=False):
        conv = layers.Conv(self.features, (3, 3), strides=self.stride, padding="SAME",
                           use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,
                           name="conv")
        norm = layers.batch_norm(NUMERICS, train, self.dtype, self.param_dtype, "bn",
                                 activation=nn.relu)
        return layers.conv_norm(conv, norm, x)


class ToyNet(nn.Module):
    """stem (3x3/2), blocks of 3x3 convolutions, global average pool, dense head."""

    num_classes: int = 1000
    include_top: bool = True
    pooling: str | None = None
    dropout_rate: float = 0.0
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train=False):
        layers.check_options("toynet", self.pooling, self.include_top, self.num_classes)
        layers.check_input(x, "toynet", 16)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = ConvBNReLU(WIDTHS[0], 2, name="stem", **kw)(jnp.asarray(x, self.dtype), train)
        for i, width in enumerate(WIDTHS[1:], start=1):
            x = ConvBNReLU(width, name=f"block{i}", **kw)(x, train)
        if not self.include_top:
            return layers.global_pool(x, self.pooling)
        x = layers.Dropout(self.dropout_rate)(jnp.mean(x, axis=(1, 2)), train)
        return nn.Dense(self.num_classes, name="head", **kw)(x)


def keras_name(path: tuple[str, ...]) -> str:
    """`('block1', 'conv')` -> `block1_conv`; the head is Keras's `predictions`."""
    return "predictions" if path == ("head",) else "_".join(path)


SPEC = models.ModelSpec("toynet", FAMILY, ToyNet, default_size=32, min_size=16,
                        numerics=NUMERICS, keras_name=None, keras_layer_name=keras_name,
                        weights={})

# ------------------------------------------------------------------ the test


def keras_toynet(num_classes: int):
    import keras

    x = inputs = keras.Input((32, 32, 3))
    for name, width, stride in [("stem", WIDTHS[0], 2), ("block1", WIDTHS[1], 1),
                                ("block2", WIDTHS[2], 1)]:
        x = keras.layers.Conv2D(width, 3, strides=stride, padding="same", use_bias=False,
                                name=f"{name}_conv")(x)
        x = keras.layers.BatchNormalization(epsilon=1e-3, name=f"{name}_bn")(x)
        x = keras.layers.ReLU()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, keras.layers.Dense(num_classes, name="predictions")(x))
    rng = np.random.default_rng(0)
    for layer in model.layers:  # real statistics, so that BatchNorm is really converted
        if isinstance(layer, keras.layers.BatchNormalization):
            gamma, beta, mean, var = layer.get_weights()
            layer.set_weights([rng.uniform(0.5, 1.5, gamma.shape), rng.normal(0, 0.2, beta.shape),
                               rng.normal(0, 0.2, mean.shape), rng.uniform(0.5, 2, var.shape)])
    return model


@pytest.fixture
def toynet():
    models.register(SPEC)
    try:
        yield SPEC
    finally:
        models.REGISTRY.pop(SPEC.name)


def test_a_new_family_converts_freezes_and_trains(toynet, tmp_path):
    import keras_reference as kr

    from tljax.weights.convert import convert

    # Converts: a Keras file of the same network gives Keras's outputs.
    km = keras_toynet(num_classes=5)
    path = kr.save_legacy_h5(km, str(tmp_path / "toynet.h5"))
    record = convert("toynet", path, str(tmp_path / "converted"))
    assert record["options"] == {"include_top": True, "num_classes": 5}
    variables = weights.load(str(tmp_path / "converted"))
    x = np.random.default_rng(1).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
    module = models.create("toynet", num_classes=5)
    np.testing.assert_allclose(module.apply(variables, x), km.predict(x, verbose=0),
                               rtol=1e-4, atol=1e-4)
    assert models.info("toynet")["family"] == "toynet"

    # Freezes by preset: the family's units and blocks, in its order.
    params = variables["params"]
    family = models.family("toynet")
    assert freeze.units(params, family) == ["stem", "block1", "block2", "head"]
    assert freeze.blocks(params, family) == ["block1", "block2"]
    labels = freeze.resolve(params, "up_to:block1", family)

    # Trains three steps: exactly the parameters and statistics after block1 change.
    tx = steps.optimizer(labels, lambda lr: optax.sgd(lr, momentum=0.9), 0.05)
    config = steps.StepConfig(model=module, tx=tx, trainable=freeze.trainable(labels),
                              frozen_bn=freeze.frozen_batchnorm(labels,
                                                                variables["batch_stats"], family))
    step = jax.jit(jax.vmap(functools.partial(steps.train_step, config=config),
                            axis_name="batch", in_axes=(0, 0, None)))
    state = jax.tree.map(lambda a: np.asarray(a)[None], steps.create_state(variables, tx))
    rng = np.random.default_rng(2)
    for i in range(3):
        batch = {"image": rng.uniform(-1, 1, (1, 4, 32, 32, 3)).astype(np.float32),
                 "label": rng.integers(0, 5, (1, 4)).astype(np.int32)}
        state, metrics = step(state, batch, jax.random.key(i))
    assert np.isfinite(float(metrics["loss"][0]))
    before = traverse_util.flatten_dict({"params": params, "stats": variables["batch_stats"]},
                                        sep="/")
    after = traverse_util.flatten_dict(
        {"params": jax.tree.map(lambda a: a[0], state.params),
         "stats": jax.tree.map(lambda a: a[0], state.batch_stats)}, sep="/")
    changed = {k.split("/")[1] for k in before if not np.array_equal(before[k], after[k])}
    assert changed == {"block2", "head"}
