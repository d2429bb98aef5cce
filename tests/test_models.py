"""The registry and the Keras-style options of every family."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from tljax import models

SMALL = {"vgg": 32, "resnet": 32, "inception": 75, "efficientnet": 32}
# One model of each family and variant kind (the parity tests cover every registered model).
REPRESENTATIVES = ["vgg16", "resnet50", "resnet50_v2", "inception_v3", "efficientnet_b0",
                   "efficientnet_lite0"]


def shapes(module, size, batch=1):
    x = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32)
    variables = jax.eval_shape(module.init, jax.random.key(0), x)
    return variables, jax.eval_shape(module.apply, variables, x)


def test_registry_lists_every_required_model():
    required = {"vgg16", "vgg19", "resnet50", "resnet101", "resnet152", "resnet50_v2",
                "resnet101_v2", "resnet152_v2", "inception_v3"}
    required |= {f"efficientnet_b{i}" for i in range(8)}
    required |= {f"efficientnet_lite{i}" for i in range(5)}
    assert required | {"test_resnet", "test_efficientnet"} == set(models.names())


@pytest.mark.parametrize("name", REPRESENTATIVES)
def test_options_and_output_shapes(name):
    spec = models.spec(name)
    size = SMALL[spec.family.name]
    _, out = shapes(models.create(name, num_classes=7), size, batch=2)
    assert out.shape == (2, 7)
    _, feats = shapes(models.create(name, include_top=False, pooling="avg"), size)
    _, fmax = shapes(models.create(name, include_top=False, pooling="max"), size)
    _, fmap = shapes(models.create(name, include_top=False), size)
    assert feats.shape == fmax.shape == (1, fmap.shape[-1]) and fmap.ndim == 4


@pytest.mark.parametrize("name", REPRESENTATIVES)
def test_parameter_paths_are_named_stages(name):
    variables, _ = shapes(models.create(name), SMALL[models.spec(name).family.name])
    paths = ["/".join(k) for k in traverse_util.flatten_dict(variables["params"])]
    assert any(p.startswith("head/") for p in paths)
    family = models.spec(name).family.name
    prefix = {"vgg": "block1/", "resnet": "stage1/", "inception": "mixed0/",
              "efficientnet": "stage1/"}[family]
    assert any(p.startswith(prefix) for p in paths)
    if family != "vgg":
        assert any(p.startswith("stem/") for p in paths)


def test_info_describes_sizes_preprocessing_parameters_and_files():
    info = models.info("resnet50")
    assert info["default_size"] == 224 and info["min_size"] == 32
    assert info["preprocessing"] == "caffe"
    assert info["params"] == 25_583_592  # Keras: trainable parameters of ResNet50
    assert info["params_notop"] == 25_583_592 - 2048 * 1000 - 1000
    assert info["keras_weights"]["top"]["md5"] == "2cb95161c43110f7111970584f804107"
    assert info["keras_weights"]["notop"]["file"].endswith("_notop.h5")
    assert models.info("inception_v3")["min_size"] == 75
    assert models.info("efficientnet_b3")["default_size"] == 300
    assert models.info("efficientnet_lite0")["keras_weights"] == {}


def test_unknown_model_suggests_the_closest():
    with pytest.raises(ValueError, match="did you mean 'resnet50'"):
        models.create("resnet05")
    with pytest.raises(ValueError, match="did you mean 'efficientnet_b0'"):
        models.create("EfficientNet-B0")


def test_unknown_option_lists_the_valid_ones():
    with pytest.raises(TypeError, match="classes.*valid: .*num_classes"):
        models.create("vgg16", classes=10)
    with pytest.raises(TypeError, match="drop_connect_rate"):
        models.create("resnet50", drop_connect_rate=0.1)


@pytest.mark.parametrize("name,size", [("resnet50", 31), ("inception_v3", 74),
                                       ("efficientnet_b0", 16), ("vgg19", 31)])
def test_input_smaller_than_minimum_is_refused(name, size):
    module = models.create(name)
    with pytest.raises(ValueError, match=r"smaller than the minimum"):
        module.init(jax.random.key(0), jnp.zeros((1, size, size, 3)))


def test_non_rgb_input_is_refused():
    with pytest.raises(ValueError, match=r"\(batch, height, width, 3\)"):
        models.create("resnet50").init(jax.random.key(0), jnp.zeros((1, 3, 64, 64)))


def test_preprocessing_modes():
    img = np.array([[[[0, 127.5, 255]]]], np.float32)
    np.testing.assert_allclose(models.preprocess("resnet50", img)[0, 0, 0],
                               [255 - 103.939, 127.5 - 116.779, 0 - 123.68], rtol=1e-6)
    np.testing.assert_allclose(models.preprocess("inception_v3", img)[0, 0, 0], [-1, 0, 1])
    np.testing.assert_allclose(models.preprocess("resnet50_v2", img)[0, 0, 0], [-1, 0, 1])
    np.testing.assert_allclose(models.preprocess("efficientnet_b0", img)[0, 0, 0], img[0, 0, 0])
    np.testing.assert_allclose(models.preprocess("efficientnet_lite0", img)[0, 0, 0],
                               [-127 / 128, 0.5 / 128, 1.0])
    assert models.preprocess("vgg16", img.astype(np.uint8)).dtype == jnp.float32


def test_preprocessing_equals_keras_preprocess_input():
    import keras_reference as kr

    raw = kr.images(2, 40)
    for name in ["vgg16", "resnet50", "resnet50_v2", "inception_v3", "efficientnet_b0"]:
        expected = kr.preprocess_input(name)(raw.astype(np.float32).copy())
        np.testing.assert_allclose(models.preprocess(name, raw), expected, rtol=1e-6, atol=1e-5)


def test_bfloat16_compute_with_float32_parameters_and_statistics():
    module = models.create("efficientnet_b0", num_classes=5, dtype=jnp.bfloat16)
    x = jax.random.uniform(jax.random.key(3), (2, 32, 32, 3), maxval=255.0)
    variables = jax.jit(module.init)(jax.random.key(0), x)
    assert all(v.dtype == jnp.float32 for v in jax.tree_util.tree_leaves(variables))
    step = jax.jit(lambda v, x: module.apply(v, x, train=True, mutable=["batch_stats"],
                                             rngs={"dropout": jax.random.key(1)}))
    out, updated = step(variables, x)
    assert out.dtype == jnp.bfloat16 and out.shape == (2, 5)
    assert all(v.dtype == jnp.float32 for v in jax.tree_util.tree_leaves(updated))


def test_param_dtype_bfloat16():
    module = models.create("resnet50", param_dtype=jnp.bfloat16)
    variables, _ = shapes(module, 32)
    assert all(v.dtype == jnp.bfloat16 for v in jax.tree_util.tree_leaves(variables["params"]))


def test_stochastic_depth_drops_whole_samples_as_keras():
    """A dropped sample's residual branch is zero; a kept one is scaled by 1 / (1 - rate), as
    Keras's Dropout(noise_shape=(None, 1, 1, 1)) does."""
    from tljax.models.efficientnet import MBConv

    block = MBConv(16, 16, 3, 1, 1, 0.25, drop_rate=0.5)
    x = jax.random.normal(jax.random.key(0), (64, 8, 8, 16))
    variables = block.init(jax.random.key(1), x)
    # Train-mode BatchNorm with frozen statistics: compare the branch with and without drop.
    no_drop = MBConv(16, 16, 3, 1, 1, 0.25, drop_rate=0.0)
    plain, _ = no_drop.apply(variables, x, train=True, mutable=["batch_stats"])
    stoch, _ = block.apply(variables, x, train=True, mutable=["batch_stats"],
                           rngs={"dropout": jax.random.key(2)})
    branch = np.asarray(plain - x).reshape(64, -1)
    got = np.asarray(stoch - x).reshape(64, -1)
    dropped = np.all(np.abs(got) < 1e-6, axis=1)
    assert 10 < dropped.sum() < 54  # about half of 64 samples
    np.testing.assert_allclose(got[~dropped], 2.0 * branch[~dropped], rtol=1e-4, atol=1e-5)


def test_stochastic_depth_rates_follow_keras_schedule():
    """Keras: block b (0-based, over all blocks) drops with drop_connect_rate * b / blocks."""
    module = models.create("efficientnet_b0", drop_connect_rate=0.2, include_top=False)
    x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
    rates = []

    def record(next_fun, args, kwargs, context):
        if type(context.module).__name__ == "MBConv" and context.method_name == "__call__":
            rates.append(context.module.drop_rate)
        return next_fun(*args, **kwargs)

    from flax import linen as nn

    with nn.intercept_methods(record):
        jax.eval_shape(module.init, jax.random.key(0), x)
    assert len(rates) == 16
    np.testing.assert_allclose(rates, [0.2 * b / 16 for b in range(16)])


def test_dropout_rate_applies_to_the_head_only_in_training():
    module = models.create("resnet50", num_classes=3, dropout_rate=0.9)
    x = jax.random.uniform(jax.random.key(3), (4, 32, 32, 3), maxval=255.0)
    variables = jax.jit(module.init)(jax.random.key(0), x)
    infer = jax.jit(module.apply)
    np.testing.assert_array_equal(infer(variables, x), infer(variables, x))
    train = jax.jit(lambda v, x, key: module.apply(
        v, x, train=True, mutable=["batch_stats"], rngs={"dropout": key})[0])
    assert not np.allclose(train(variables, x, jax.random.key(1)),
                           train(variables, x, jax.random.key(2)))
