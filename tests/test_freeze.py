"""Freeze specifications: presets for every registered model against its real parameter tree,
and the errors that say what to change."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import pytest

from tljax import freeze, models

SIZE = {"vgg": 32, "resnet": 32, "inception": 75, "efficientnet": 32}


@functools.cache
def variables(name: str):
    module = models.create(name, num_classes=10)
    size = SIZE[models.spec(name).family.name]
    x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    return jax.eval_shape(module.init, jax.random.key(0), x)


def _presets(name):
    params, family = variables(name)["params"], models.family(name)
    return ["none", "backbone", f"up_to:{freeze.units(params, family)[1]}",
            f"up_to:{freeze.units(params, family)[-2]}", "top:1", "top:3"]


@pytest.mark.parametrize("name", models.names())
def test_every_preset_covers_every_parameter(name):
    v = variables(name)
    params, family = v["params"], models.family(name)
    n_params = len(freeze.paths(params))
    for preset in _presets(name):
        labels = freeze.resolve(params, preset, family)
        flat = jax.tree_util.tree_leaves(labels)
        assert len(flat) == n_params
        assert set(flat) <= {freeze.FROZEN, freeze.TRAIN, freeze.HEAD}
        trained = freeze.trainable(labels)
        assert any(p.startswith("head/") for p in trained), preset  # the head always learns
        if preset == "none":
            assert len(trained) == n_params
        if preset == "backbone":
            assert all(p.startswith("head/") for p in trained)
            if family.name != "vgg":  # VGG has no BatchNorm
                assert len(freeze.frozen_batchnorm(labels, v["batch_stats"])) > 0
        if preset.startswith("top:"):
            n = int(preset[4:])
            blocks = freeze.blocks(params, family)
            learned_blocks = {b for b in blocks if any(p.startswith(b + "/") for p in trained)}
            assert learned_blocks == set(blocks[-n:]), preset


def test_up_to_freezes_the_stem_and_stages_up_to_the_named_one():
    params, family = variables("resnet50")["params"], models.family("resnet50")
    labels = freeze.resolve(params, "up_to:stage2", family)
    trained = freeze.trainable(labels)
    assert not any(p.startswith(("stem/", "stage1/", "stage2/")) for p in trained)
    assert any(p.startswith("stage3/") for p in trained)
    assert freeze.units(params, family) == ["stem", "stage1", "stage2", "stage3", "stage4",
                                            "head"]


def test_units_and_blocks_are_in_model_order():
    p = variables("inception_v3")["params"]
    assert freeze.units(p, models.family("inception_v3")) == (
        ["stem"] + [f"mixed{i}" for i in range(11)] + ["head"])
    e, ef = variables("efficientnet_b0")["params"], models.family("efficientnet_b0")
    assert freeze.blocks(e, ef)[:3] == ["stage1/block1", "stage2/block1", "stage2/block2"]
    assert freeze.units(e, ef)[-2:] == ["top", "head"]
    v = variables("vgg16")["params"]
    assert freeze.units(v, models.family("vgg16")) == ["block1", "block2", "block3", "block4",
                                                       "block5", "fc1", "fc2", "head"]


def test_first_match_wins_and_table_counts_parameters():
    params = variables("resnet50")["params"]
    spec = [(r"head/.*", "head"), (r"stage4/.*", "train"), (r"stage4/block3/.*", "never"),
            (r".*", freeze.FROZEN)]
    with pytest.raises(freeze.FreezeError, match="rule 2 .*matches no parameter"):
        freeze.resolve(params, spec)  # stage4/block3 is taken by the rule before it
    labels = freeze.resolve(params, spec[:2] + spec[3:])
    table = freeze.table(labels, params)
    assert "head" in table and "20,490" in table  # 2048 * 10 + 10
    assert table.splitlines()[-1].startswith("frozen")


def test_regex_that_matches_nothing_names_the_units():
    params = variables("resnet50")["params"]
    with pytest.raises(freeze.FreezeError) as e:
        freeze.resolve(params, [(r"stage9/.*", "train"), (r".*", freeze.FROZEN)],
                       models.family("resnet50"))
    msg = str(e.value)
    assert "'stage9/.*'" in msg and "stem, stage1, stage2, stage3, stage4, head" in msg


def test_uncovered_parameters_are_listed():
    params = variables("resnet50")["params"]
    with pytest.raises(freeze.FreezeError, match=r"match no freeze rule: stem/bn/bias.*catch-all"):
        freeze.resolve(params, [(r"stage.*", "train"), (r"head/.*", "head")])


def test_invalid_regex_and_unknown_preset():
    params = variables("resnet50")["params"]
    with pytest.raises(freeze.FreezeError, match="not a valid regex"):
        freeze.resolve(params, [(r"stage(", "train")])
    with pytest.raises(freeze.FreezeError, match="unknown freeze preset 'head_only'"):
        freeze.resolve(params, "head_only")
    with pytest.raises(freeze.FreezeError, match="no unit 'stage5'.*stem, stage1"):
        freeze.resolve(params, "up_to:stage5", models.family("resnet50"))
    with pytest.raises(freeze.FreezeError, match="has 16 blocks"):
        freeze.resolve(params, "top:17", models.family("resnet50"))
    with pytest.raises(freeze.FreezeError, match="needs the model's family"):
        freeze.resolve(params, "top:1")


def test_layerwise_decay_multipliers():
    params = variables("resnet50")["params"]
    spec, mult = freeze.layerwise_decay(params, models.family("resnet50"), 0.5,
                                        head_multiplier=10)
    labels = freeze.resolve(params, spec)
    assert mult["head"] == 10 and mult["block016"] == 1 and mult["block015"] == 0.5
    assert mult["stem"] == 0.5 ** 16
    assert set(jax.tree_util.tree_leaves(labels)) == set(mult)


def test_frozen_efficientnet_blocks_drop_no_stochastic_depth():
    """A frozen EfficientNet backbone in training mode computes its inference features: its
    BatchNorm uses the moving statistics and its blocks skip stochastic depth."""
    from tljax.models.layers import TrainMode

    module = models.create("efficientnet_b0", num_classes=10, dropout_rate=0.0)
    v = models.random_variables(module, 32)
    x = jax.random.uniform(jax.random.key(1), (4, 32, 32, 3), maxval=255.0)
    infer = module.apply(v, x)

    def train(preset, seed):
        family = models.family("efficientnet_b0")
        labels = freeze.resolve(v["params"], preset, family)
        mode = TrainMode(frozen_bn=freeze.frozen_batchnorm(labels, v["batch_stats"], family))
        out, _ = module.apply(v, x, train=mode, mutable=["batch_stats"],
                              rngs={"dropout": jax.random.key(seed)})
        return out

    assert jnp.array_equal(train("backbone", 0), infer)
    assert jnp.array_equal(train("backbone", 1), infer)
    # Where blocks train, stochastic depth is active: two dropout keys give two outputs.
    assert not jnp.allclose(train("top:3", 0), train("top:3", 1))
