"""VGG16 and VGG19, as `keras.applications.VGG16/VGG19`.

Parameter paths: `block{1..5}/conv{j}`, then with the top `fc1`, `fc2` and `head`
(Keras's `predictions`).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
from flax import linen as nn

from tljax.models import layers
from tljax.models.family import Family
from tljax.models.features import tap

NUMERICS = layers.Numerics(
    bn_epsilon=0.0,  # VGG has no BatchNorm.
    bn_momentum=0.0,
    bn_scale=False,
    preprocessing="caffe",
    padding="3x3 stride-1 'SAME' convolutions (symmetric), 'valid' 2x2 max pooling, as Keras",
)
MIN_SIZE = 32
FAMILY = Family("vgg", units=(r"block\d+", "fc1", "fc2", "head"), blocks=r"block\d+")
DEFAULT_SIZE = 224

# Convolutions per block (Keras `vgg16.py` / `vgg19.py`).
VGG16_BLOCKS = (2, 2, 3, 3, 3)
VGG19_BLOCKS = (2, 2, 4, 4, 4)
WIDTHS = (64, 128, 256, 512, 512)


class VGGBlock(nn.Module):
    """`n` 3x3 convolutions with ReLU, then 2x2 max pooling."""

    width: int
    n: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        for j in range(1, self.n + 1):
            x = layers.Conv(
                self.width, (3, 3), padding="SAME", dtype=self.dtype,
                param_dtype=self.param_dtype, name=f"conv{j}",
            )(x)
            x = tap(f"{self.name}_conv{j}", nn.relu(x))
        return tap(f"{self.name}_pool", layers.max_pool(x, 2, 2))


class VGG(nn.Module):
    """VGG with the options of Keras Applications."""

    blocks: Sequence[int]
    num_classes: int = 1000
    include_top: bool = True
    pooling: str | None = None
    dropout_rate: float = 0.0  # Keras VGG has no dropout; offered for fine-tuning heads.
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    model_name: str = "vgg"

    @nn.compact
    def __call__(self, x, train: bool = False):
        layers.check_options(self.model_name, self.pooling, self.include_top, self.num_classes)
        layers.check_input(x, self.model_name, MIN_SIZE)
        x = jnp.asarray(x, self.dtype)
        for b, (n, width) in enumerate(zip(self.blocks, WIDTHS, strict=True), start=1):
            x = VGGBlock(width, n, self.dtype, self.param_dtype, name=f"block{b}")(x)
        if not self.include_top:
            return layers.global_pool(x, self.pooling)
        x = x.reshape((x.shape[0], -1))  # Keras Flatten on NHWC: (h, w, c) order, as here.
        dense = functools.partial(nn.Dense, dtype=self.dtype, param_dtype=self.param_dtype)
        x = nn.relu(dense(4096, name="fc1")(x))
        x = nn.relu(dense(4096, name="fc2")(x))
        x = layers.Dropout(self.dropout_rate)(x, train)
        return dense(self.num_classes, name="head")(x)


VGG16 = functools.partial(VGG, blocks=VGG16_BLOCKS, model_name="vgg16")
VGG19 = functools.partial(VGG, blocks=VGG19_BLOCKS, model_name="vgg19")


def keras_name(path: tuple[str, ...]) -> str:
    """Keras layer name of the Flax module at `path` (`('block1', 'conv2')` -> `block1_conv2`)."""
    if path == ("head",):
        return "predictions"
    return "_".join(path)
