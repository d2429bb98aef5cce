"""The training program's optimizer (`run.optimizer`) and loss against hand computations: the
schedule's values, which parameters weight decay touches, gradient clipping, Nesterov, label
smoothing; and the config fields that choose them."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from processes import CONFIG, config_module

from tljax import run
from tljax import train_step as steps

PARAMS = {"conv": {"kernel": np.full((2, 2), 2.0, np.float32)},
          "bn": {"scale": np.full((2,), 3.0, np.float32), "bias": np.full((2,), 4.0, np.float32)},
          "head": {"kernel": np.full((2, 2), 5.0, np.float32),
                   "bias": np.full((2,), 6.0, np.float32)}}
LABELS = {"conv": {"kernel": "train"}, "bn": {"scale": "train", "bias": "train"},
          "head": {"kernel": "head", "bias": "head"}}


def phase(steps_: int = 100, **optimizer) -> run.Phase:
    c = config_module().get_config("model=test_resnet,init=scratch")
    c.optimizer.update(optimizer)
    return run.Phase("", 0, steps_, "none", c.optimizer, "reset", False)


def one_update(tx, grads, params=PARAMS):
    updates, _ = tx.update(grads, tx.init(params), params)
    return jax.tree.map(np.asarray, updates)


def zeros(tree):
    return jax.tree.map(np.zeros_like, tree)


def test_warmup_then_cosine_and_the_head_multiplier():
    tx, schedule = run.optimizer(phase(100, name="sgd", learning_rate=0.1, warmup_steps=10,
                                       momentum=0.0, head_multiplier=10.0), LABELS)
    assert float(schedule(0)) == 0.0
    assert float(schedule(5)) == pytest.approx(0.05)
    assert float(schedule(10)) == pytest.approx(0.1)
    # cosine from 0.1 at step 10 to 0 at step 100
    assert float(schedule(55)) == pytest.approx(0.05 * (1 + math.cos(math.pi * 45 / 90)))
    assert float(schedule(100)) == pytest.approx(0.0, abs=1e-9)
    default = run.optimizer(phase(200, name="sgd", learning_rate=0.1), LABELS)[1]
    assert float(default(10)) == pytest.approx(0.1)  # 5% of 200 steps of warmup
    # Step 0's rate is 0: look at the second update, at rate schedule(1) = 0.01.
    grads = jax.tree.map(np.ones_like, PARAMS)
    state = tx.init(PARAMS)
    _, state = tx.update(grads, state, PARAMS)
    updates, _ = tx.update(grads, state, PARAMS)
    np.testing.assert_allclose(updates["conv"]["kernel"], -0.01, rtol=1e-6)
    np.testing.assert_allclose(updates["head"]["kernel"], -0.1, rtol=1e-6)


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_weight_decay_touches_kernels_only(name):
    """With no gradient, decay alone moves the kernels; BatchNorm scales, offsets and biases
    stay where they are."""
    tx, _ = run.optimizer(phase(10, name=name, learning_rate=0.1, warmup_steps=0,
                                schedule="constant", momentum=0.0, weight_decay=0.5), LABELS)
    updates = one_update(tx, zeros(PARAMS))
    # sgd: -lr * wd * p (L2 through the gradient); adamw: -lr * wd * p (decoupled)
    np.testing.assert_allclose(updates["conv"]["kernel"], -0.1 * 0.5 * 2.0, rtol=1e-6)
    np.testing.assert_allclose(updates["head"]["kernel"], -0.1 * 0.5 * 5.0, rtol=1e-6)
    for path in (("bn", "scale"), ("bn", "bias"), ("head", "bias")):
        assert not np.any(updates[path[0]][path[1]]), path
    everything, _ = run.optimizer(phase(10, name=name, learning_rate=0.1, warmup_steps=0,
                                        schedule="constant", momentum=0.0, weight_decay=0.5,
                                        weight_decay_on=".*"), LABELS)
    np.testing.assert_allclose(one_update(everything, zeros(PARAMS))["bn"]["scale"],
                               -0.1 * 0.5 * 3.0, rtol=1e-6)


def test_gradients_are_clipped_to_their_global_norm():
    grads = {"conv": {"kernel": np.full((2, 2), 3.0, np.float32)},
             "bn": {"scale": np.zeros(2, np.float32), "bias": np.zeros(2, np.float32)},
             "head": {"kernel": np.full((2, 2), 4.0, np.float32),
                      "bias": np.zeros(2, np.float32)}}
    norm = math.sqrt(4 * 9 + 4 * 16)  # 10
    tx, _ = run.optimizer(phase(10, name="sgd", learning_rate=1.0, warmup_steps=0,
                                schedule="constant", momentum=0.0, clip_norm=2.0), LABELS)
    updates = one_update(tx, grads)
    np.testing.assert_allclose(updates["conv"]["kernel"], -3.0 * 2.0 / norm, rtol=1e-6)
    np.testing.assert_allclose(updates["head"]["kernel"], -4.0 * 2.0 / norm, rtol=1e-6)
    loose, _ = run.optimizer(phase(10, name="sgd", learning_rate=1.0, warmup_steps=0,
                                   schedule="constant", momentum=0.0, clip_norm=100.0), LABELS)
    np.testing.assert_allclose(one_update(loose, grads)["conv"]["kernel"], -3.0, rtol=1e-6)


def test_nesterov_momentum():
    """Nesterov's first update with gradient g at momentum m is -lr * (1 + m) * g."""
    grads = jax.tree.map(np.ones_like, PARAMS)
    tx, _ = run.optimizer(phase(10, name="sgd", learning_rate=0.1, warmup_steps=0,
                                schedule="constant", momentum=0.9, nesterov=True), LABELS)
    np.testing.assert_allclose(one_update(tx, grads)["conv"]["kernel"], -0.1 * 1.9, rtol=1e-6)


def test_label_smoothing_against_a_hand_computation():
    logits = jnp.array([[2.0, 0.5, -1.0], [0.0, 1.0, 3.0]])
    labels = jnp.array([0, 2])
    s = 0.1
    logp = np.log(np.exp(np.asarray(logits)) / np.exp(np.asarray(logits)).sum(-1,
                                                                                keepdims=True))
    target = np.full((2, 3), s / 3)
    target[[0, 1], [0, 2]] += 1 - s
    expected = -(target * logp).sum(-1)
    np.testing.assert_allclose(steps.cross_entropy(logits, labels, s), expected, rtol=1e-6)
    np.testing.assert_allclose(steps.cross_entropy(logits, labels),
                               -logp[[0, 1], [0, 2]], rtol=1e-6)


@pytest.mark.parametrize("overrides, message", [
    ({"optimizer.name": "adam", "optimizer.weight_decay": 1e-4}, "with adam.*adamw"),
    ({"optimizer.clip_norm": 0.0}, "clip_norm=0.0: a positive"),
    ({"label_smoothing": 1.0}, r"label_smoothing=1.0: in \[0, 1\)"),
    ({"optimizer.weight_decay_on": "("}, "not a regular expression"),
    ({"optimizer.nesterov": True, "optimizer.momentum": 0.0}, "nesterov.*momentum > 0"),
    ({"dropout_rate": -1.0}, r"dropout_rate=-1.0: in \[0, 1\)"),
    ({"optimizer.warmup_steps": -1}, "warmup_steps=-1: 0 or more"),
    ({"train_split": "train"}, "train_split='train' and config.validation_split='train"),
    ({"validation_split": "train[:10%]"}, "share examples"),
    ({"test_split": "train[95%:]"}, "validation_split='train.90%:.' and config.test_split"),
    ({"ema_decay": 1.0}, r"ema_decay=1.0: in \[0, 1\)"),
    ({"select_on": "ema"}, "select_on='ema' needs a moving average: set config.ema_decay"),
    ({"select_on": "best", "ema_decay": 0.99}, "select_on='best': 'raw'.* or 'ema'"),
])
def test_options_that_cannot_work_are_refused(data_dir, overrides, message):
    c = config_module().get_config("model=test_resnet,init=scratch")
    c.data_dir = data_dir
    for field, value in overrides.items():
        parent, _, leaf = field.rpartition(".")
        (c[parent] if parent else c)[leaf] = value
    with pytest.raises(run.RunError, match=message):
        run.resolve(c)


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_weight_decay_resolves_with_sgd_and_adamw(data_dir, name):
    c = config_module().get_config("model=test_resnet,init=scratch,steps=10")
    c.data_dir, c.optimizer.name, c.optimizer.weight_decay = data_dir, name, 1e-4
    r = run.resolve(c)
    assert (r.train_split, r.validation_split, r.test_split) == ("train[:90%]", "train[90%:]",
                                                                 "test")
    assert r.select == "raw"
    c.ema_decay = 0.999  # a moving average is what the run then selects on, unless told
    assert run.resolve(c).select == "ema"
    c.select_on = "raw"
    assert run.resolve(c).select == "raw"


def test_none_means_the_default_and_the_command_line_sets_a_value(tmp_path):
    import subprocess
    import sys

    from processes import ROOT

    d = config_module().get_config("model=test_resnet,dataset=tf_flowers")
    assert d.dropout_rate is None and d.optimizer.warmup_steps is None
    assert d.optimizer.clip_norm is None and d.bn_momentum is None
    assert d.optimizer.weight_decay_on == ".*/kernel$" and d.label_smoothing == 0.0
    assert d.ema_decay is None and d.select_on == ""
    # Fields whose default is None take typed values (the run then stops at the dtype).
    out = subprocess.run(
        [sys.executable, "-m", "tljax.train", f"--config={CONFIG}:model=test_resnet",
         "--config.dropout_rate=0.0", "--config.optimizer.warmup_steps=0",
         "--config.optimizer.clip_norm=1.5", "--config.bn_momentum=0.0",
         "--config.label_smoothing=0.1", "--config.ema_decay=0.999", "--config.dtype=float64",
         f"--workdir={tmp_path / 'w'}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "config.dtype='float64'" in out.stderr, \
        out.stderr[-2000:]
