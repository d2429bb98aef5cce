"""`create(name, include_top=False, features=NAMES)`: the outputs of layers inside each family,
equal to Keras's `Model(base.input, base.get_layer(name).output)` on the same converted weights
(random BatchNorm statistics, as the parity tests), and nothing computed past the last one."""

from __future__ import annotations

import jax
import keras_reference as kr
import numpy as np
import pytest
from flax import traverse_util

from tljax import models, weights
from weights_conversion.__main__ import main as convert_cli

TOLERANCE = 1e-4
# Keras layer names (block and stage outputs, and those inside blocks), then tljax units with
# the Keras layer each equals.
CASES = {
    "vgg19": (["block2_pool", "block4_conv2", "block5_conv1"], {"block3": "block3_pool"}),
    "resnet50": (["conv1_relu", "conv3_block4_out", "conv4_block6_out"],
                 {"stage3": "conv4_block6_out"}),
    "resnet50_v2": (["pool1_pool", "conv3_block4_out", "post_relu"],
                    {"stage2": "conv3_block4_out"}),
    "inception_v3": (["mixed0", "mixed2", "mixed7"], {}),
    "efficientnet_b0": (["stem_activation", "block1a_project_bn", "block2b_add",
                         "block6a_expand_activation", "top_activation"],
                        {"stage5": "block5c_add", "top": "top_activation"}),
}
SIZE = {"vgg19": 50, "resnet50": 71, "resnet50_v2": 71, "inception_v3": 107,
        "efficientnet_b0": 67}


@pytest.mark.parametrize("name", list(CASES))
def test_features_equal_keras_intermediate_layers(name, tmp_path):
    import keras

    keras_names, units = CASES[name]
    size = SIZE[name]
    km = kr.build(name, include_top=False, size=size, seed=0, pooling=None)
    kr.randomize_statistics(km, seed=1)
    path = kr.save_legacy_h5(km, str(tmp_path / f"{name}.h5"))
    out_dir = str(tmp_path / "converted")
    assert convert_cli(["--model", name, "--input", path, "--output", out_dir]) == 0

    wanted = keras_names + list(units.values())
    probe = keras.Model(km.input, [km.get_layer(n).output for n in wanted])
    raw = kr.images(2, size)
    x = kr.preprocess_input(name)(raw.astype(np.float32).copy())
    expected = dict(zip(wanted, (np.asarray(a) for a in probe(x, training=False)), strict=True))

    module = models.create(name, include_top=False, features=keras_names + list(units))
    got = jax.jit(module.apply)(weights.load(out_dir), models.preprocess(name, raw))
    assert set(got) == set(keras_names) | set(units)
    for ours, theirs in [(n, n) for n in keras_names] + list(units.items()):
        a, b = np.asarray(got[ours]), expected[theirs]
        assert a.shape == b.shape, (ours, a.shape, b.shape)
        scale = max(1.0, float(np.abs(b).max()))
        err = float(np.abs(a - b).max())
        assert err <= TOLERANCE * scale, f"{name} {ours}: max |diff| {err:.3g}, scale {scale:.3g}"


def test_nothing_after_the_last_requested_output_is_computed():
    x = jax.ShapeDtypeStruct((1, 64, 64, 3), np.float32)
    base = models.create("vgg19", include_top=False)
    variables = jax.eval_shape(base.init, jax.random.key(0), x)

    def equations(names):
        module = models.create("vgg19", include_top=False, features=names)
        assert jax.eval_shape(module.init, jax.random.key(0), x) == variables  # all of them
        return len(jax.make_jaxpr(module.apply)(variables, x).jaxpr.eqns)

    early, late = equations(["block1_conv2", "block2_pool"]), equations(["block5_pool"])
    assert early < late / 3, (early, late)
    module = models.create("vgg19", include_top=False, features=["block2_pool", "block1_conv2"])
    out = jax.eval_shape(module.apply, variables, x)
    assert {k: v.shape for k, v in out.items()} == {"block2_pool": (1, 16, 16, 128),
                                                     "block1_conv2": (1, 64, 64, 64)}


@pytest.mark.parametrize("name", ["test_resnet", "test_efficientnet"])
def test_every_listed_name_is_an_output(name):
    x = jax.ShapeDtypeStruct((1, 32, 32, 3), np.float32)
    names = models.info(name)["features"]
    module = models.create(name, include_top=False, features=names)
    variables = jax.eval_shape(module.init, jax.random.key(0), x)
    out = jax.eval_shape(module.apply, variables, x)
    assert set(out) == set(names) and all(v.ndim == 4 for v in out.values())


def test_an_extractor_inside_a_module_of_yours():
    """As a submodule (a perceptual loss, a detector's backbone), jitted and called twice."""
    import flax.linen as nn

    class Perceptual(nn.Module):
        @nn.compact
        def __call__(self, a, b):
            extract = models.create("test_resnet", include_top=False,
                                    features=["conv2_block1_out", "stage3"])
            fa, fb = extract(a), extract(b)
            return sum(((fa[k] - fb[k]) ** 2).mean() for k in fa)

    rng = np.random.default_rng(0)
    a, b = (rng.normal(size=(2, 32, 32, 3)).astype(np.float32) for _ in range(2))
    variables = Perceptual().init(jax.random.key(0), a, b)
    loss = jax.jit(Perceptual().apply)
    first, again = float(loss(variables, a, b)), float(loss(variables, a, b))
    assert first == again and first > 0 and float(loss(variables, a, a)) == 0.0


def test_load_gives_pretrained_features_offline():
    module, variables = models.load("efficientnet_lite0", include_top=False,
                                    features=["block6a_expand_activation", "top_activation"])
    full, _ = models.load("efficientnet_lite0", include_top=False)
    from PIL import Image
    from skimage import data

    cat = np.asarray(Image.fromarray(data.chelsea()).resize((224, 224)))[None]
    x = models.preprocess("efficientnet_lite0", cat)
    maps = module.apply(variables, x)
    assert maps["block6a_expand_activation"].shape == (1, 14, 14, 672)  # before its stride 2
    np.testing.assert_allclose(np.asarray(maps["top_activation"]),
                               np.asarray(full.apply(variables, x)), rtol=0, atol=1e-5)


def test_info_lists_the_names_in_the_order_computed():
    names = models.info("resnet50")["features"]
    assert names.index("conv1_relu") < names.index("conv3_block4_out") < names.index("stage4")
    assert {"stem", "stage1", "stage2", "stage3", "stage4", "conv4_block6_out"} <= set(names)
    effnet = models.info("efficientnet_b0")["features"]
    assert effnet[-2:] == ["top_activation", "top"]
    assert "mixed7" in models.info("inception_v3")["features"]


def test_unknown_names_and_a_top_are_refused():
    module = models.create("resnet50", include_top=False, features=["conv4_block6_output"])
    with pytest.raises(ValueError, match=r"'conv4_block6_output' \(did you mean "
                                         r"'conv4_block6_out'.*this model has: conv1_relu"):
        jax.eval_shape(module.init, jax.random.key(0),
                       jax.ShapeDtypeStruct((1, 64, 64, 3), np.float32))
    with pytest.raises(ValueError, match="include_top=False"):
        models.create("resnet50", features=["stage3"])


def test_features_use_the_model_variables_unchanged():
    """The extractor's variables are the full model's: a pretrained tree fits as it is."""
    base = models.create("test_resnet", include_top=False)
    x = jax.ShapeDtypeStruct((1, 32, 32, 3), np.float32)
    full = jax.eval_shape(base.init, jax.random.key(0), x)
    module = models.create("test_resnet", include_top=False, features=["stage4"])
    part = jax.eval_shape(module.init, jax.random.key(0), x)
    flat_full = traverse_util.flatten_dict(full, sep="/")
    assert set(traverse_util.flatten_dict(part, sep="/")) == set(flat_full)
    variables = models.random_variables(base, 32)
    images = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
    feature_map = base.apply(variables, images)
    np.testing.assert_array_equal(np.asarray(module.apply(variables, images)["stage4"]),
                                  np.asarray(feature_map))
