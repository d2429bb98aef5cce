"""A tiny ResNet fine-tuning setup shared by the multi-device and multi-process tests (and the
worker processes they start): same model, data, freeze and optimizer everywhere."""

from __future__ import annotations

import functools

import jax
import numpy as np
import optax
from flax import traverse_util

from tljax import freeze
from tljax import train_step as steps
from tljax.models import resnet

GLOBAL_BATCH = 16
SIZE = 64


def tiny_model():
    """A ResNet with one bottleneck block per stage: real BatchNorm layers, small to compile."""
    return resnet.ResNet(stage_sizes=(1, 1, 1, 1), num_classes=5, model_name="resnet_tiny")


@functools.cache
def setup(preset: str = "up_to:stage2"):
    model = tiny_model()
    rng = np.random.default_rng(0)
    images = rng.normal(size=(3, GLOBAL_BATCH, SIZE, SIZE, 3)).astype(np.float32)
    labels = rng.integers(0, 5, size=(3, GLOBAL_BATCH)).astype(np.int32)
    variables = jax.jit(model.init)(jax.random.key(0), images[0, :1])
    # Random moving statistics, so that frozen BatchNorm layers are really exercised.
    stats = traverse_util.flatten_dict(variables["batch_stats"])
    for i, key in enumerate(sorted(stats)):
        r = np.random.default_rng(i)
        stats[key] = (r.uniform(0.5, 2.0, stats[key].shape) if key[-1] == "var"
                      else r.normal(0, 0.3, stats[key].shape)).astype(np.float32)
    # Host copies: the compiled steps donate their input buffers.
    variables = {"params": jax.tree.map(np.asarray, variables["params"]),
                 "batch_stats": traverse_util.unflatten_dict(stats)}
    labels_tree = freeze.resolve(variables["params"], preset, resnet.FAMILY)
    tx = steps.optimizer(labels_tree, lambda lr: optax.sgd(lr, momentum=0.9), 0.01,
                         {"head": 2.0})
    return model, variables, labels_tree, tx, [{"image": i, "label": lb}
                                                for i, lb in zip(images, labels, strict=True)]


def config(sync_bn: bool, preset="up_to:stage2"):
    model, variables, labels, tx, _ = setup(preset)
    return steps.StepConfig(model=model, tx=tx, trainable=freeze.trainable(labels),
                            frozen_bn=freeze.frozen_batchnorm(labels, variables["batch_stats"]),
                            sync_bn=sync_bn)
