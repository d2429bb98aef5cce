"""InceptionV3, as `keras.applications.InceptionV3`.

Parameter paths: `stem/conv{1..5}/{conv,bn}`, `mixed{0..10}/<branch>/{conv,bn}` with the
branch names of Keras's source (`branch1x1`, `branch5x5_1`, `branch3x3dbl_2`, `branch_pool`,
...), and `head` (Keras's `predictions`).

Keras names these layers automatically (`conv2d_N`, `batch_normalization_N`, numbered in
creation order), so the conversion matches them by creation order: the modules below are
created in exactly the order of Keras's `inception_v3.py`.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from flax import linen as nn

from tljax.models import layers
from tljax.models.family import Family

NUMERICS = layers.Numerics(
    bn_epsilon=1e-3,  # Keras BatchNormalization default
    bn_momentum=0.99,
    bn_scale=False,  # conv2d_bn: BatchNormalization(scale=False)
    preprocessing="tf",
    padding="'valid' or TF 'SAME' per layer as in Keras; 'SAME' average pooling excludes the pad",
)
MIN_SIZE = 75
FAMILY = Family("inception", units=("stem", r"mixed\d+", "head"), blocks=r"mixed\d+")
DEFAULT_SIZE = 299


class ConvBN(nn.Module):
    """Keras `conv2d_bn`: convolution without bias, BatchNorm without scale, ReLU."""

    features: int
    kernel: tuple[int, int]
    strides: tuple[int, int] = (1, 1)
    padding: str = "SAME"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        conv = layers.Conv(
            self.features, self.kernel, strides=self.strides, padding=self.padding,
            use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype, name="conv",
        )
        norm = layers.batch_norm(NUMERICS, train, self.dtype, self.param_dtype, "bn",
                                 activation=nn.relu)
        return layers.conv_norm(conv, norm, x)


def _avg_pool_same(x):
    # TF/Keras 'SAME' average pooling divides by the number of real (unpadded) pixels.
    return layers.avg_pool_same(x, 3)


def _max_pool(x):
    return layers.max_pool(x, 3, 2)


class _Mixed(nn.Module):
    """Base for the mixed blocks: `self.cbn(name, features, kernel, ...)` makes a ConvBN."""

    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def cbn(self, x, train, name, features, kernel, strides=(1, 1), padding="SAME"):
        return ConvBN(
            features, kernel, strides, padding, self.dtype, self.param_dtype, name=name
        )(x, train)


class MixedA(_Mixed):
    """mixed0-2 (35x35): 1x1, 5x5, double 3x3 and pooled branches."""

    pool_features: int = 32

    @nn.compact
    def __call__(self, x, train: bool = False):
        b1 = self.cbn(x, train, "branch1x1", 64, (1, 1))
        b5 = self.cbn(x, train, "branch5x5_1", 48, (1, 1))
        b5 = self.cbn(b5, train, "branch5x5_2", 64, (5, 5))
        b3 = self.cbn(x, train, "branch3x3dbl_1", 64, (1, 1))
        b3 = self.cbn(b3, train, "branch3x3dbl_2", 96, (3, 3))
        b3 = self.cbn(b3, train, "branch3x3dbl_3", 96, (3, 3))
        bp = self.cbn(_avg_pool_same(x), train, "branch_pool", self.pool_features, (1, 1))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class MixedB(_Mixed):
    """mixed3 (35x35 -> 17x17): strided 3x3, strided double 3x3 and max-pool branches."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        b3 = self.cbn(x, train, "branch3x3", 384, (3, 3), (2, 2), "VALID")
        bd = self.cbn(x, train, "branch3x3dbl_1", 64, (1, 1))
        bd = self.cbn(bd, train, "branch3x3dbl_2", 96, (3, 3))
        bd = self.cbn(bd, train, "branch3x3dbl_3", 96, (3, 3), (2, 2), "VALID")
        return jnp.concatenate([b3, bd, _max_pool(x)], axis=-1)


class MixedC(_Mixed):
    """mixed4-7 (17x17): factorised 7x7 branches with `channels_7x7` inner width."""

    channels_7x7: int = 128

    @nn.compact
    def __call__(self, x, train: bool = False):
        c = self.channels_7x7
        b1 = self.cbn(x, train, "branch1x1", 192, (1, 1))
        b7 = self.cbn(x, train, "branch7x7_1", c, (1, 1))
        b7 = self.cbn(b7, train, "branch7x7_2", c, (1, 7))
        b7 = self.cbn(b7, train, "branch7x7_3", 192, (7, 1))
        bd = self.cbn(x, train, "branch7x7dbl_1", c, (1, 1))
        bd = self.cbn(bd, train, "branch7x7dbl_2", c, (7, 1))
        bd = self.cbn(bd, train, "branch7x7dbl_3", c, (1, 7))
        bd = self.cbn(bd, train, "branch7x7dbl_4", c, (7, 1))
        bd = self.cbn(bd, train, "branch7x7dbl_5", 192, (1, 7))
        bp = self.cbn(_avg_pool_same(x), train, "branch_pool", 192, (1, 1))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class MixedD(_Mixed):
    """mixed8 (17x17 -> 8x8)."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        b3 = self.cbn(x, train, "branch3x3_1", 192, (1, 1))
        b3 = self.cbn(b3, train, "branch3x3_2", 320, (3, 3), (2, 2), "VALID")
        b7 = self.cbn(x, train, "branch7x7x3_1", 192, (1, 1))
        b7 = self.cbn(b7, train, "branch7x7x3_2", 192, (1, 7))
        b7 = self.cbn(b7, train, "branch7x7x3_3", 192, (7, 1))
        b7 = self.cbn(b7, train, "branch7x7x3_4", 192, (3, 3), (2, 2), "VALID")
        return jnp.concatenate([b3, b7, _max_pool(x)], axis=-1)


class MixedE(_Mixed):
    """mixed9-10 (8x8): expanded filter bank."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        b1 = self.cbn(x, train, "branch1x1", 320, (1, 1))
        b3 = self.cbn(x, train, "branch3x3", 384, (1, 1))
        b3 = jnp.concatenate(
            [self.cbn(b3, train, "branch3x3_1", 384, (1, 3)),
             self.cbn(b3, train, "branch3x3_2", 384, (3, 1))], axis=-1,
        )
        bd = self.cbn(x, train, "branch3x3dbl_1", 448, (1, 1))
        bd = self.cbn(bd, train, "branch3x3dbl_2", 384, (3, 3))
        bd = jnp.concatenate(
            [self.cbn(bd, train, "branch3x3dbl_3a", 384, (1, 3)),
             self.cbn(bd, train, "branch3x3dbl_3b", 384, (3, 1))], axis=-1,
        )
        bp = self.cbn(_avg_pool_same(x), train, "branch_pool", 192, (1, 1))
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class Stem(_Mixed):
    """Five ConvBN layers and two max pools: 299x299x3 -> 35x35x192."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = self.cbn(x, train, "conv1", 32, (3, 3), (2, 2), "VALID")
        x = self.cbn(x, train, "conv2", 32, (3, 3), padding="VALID")
        x = self.cbn(x, train, "conv3", 64, (3, 3))
        x = _max_pool(x)
        x = self.cbn(x, train, "conv4", 80, (1, 1), padding="VALID")
        x = self.cbn(x, train, "conv5", 192, (3, 3), padding="VALID")
        return _max_pool(x)


class InceptionV3(nn.Module):
    """InceptionV3 with the options of Keras Applications."""

    num_classes: int = 1000
    include_top: bool = True
    pooling: str | None = None
    dropout_rate: float = 0.0  # Keras InceptionV3 has none; offered for fine-tuning heads.
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    model_name: str = "inception_v3"

    @nn.compact
    def __call__(self, x, train: bool = False):
        layers.check_options(self.model_name, self.pooling, self.include_top, self.num_classes)
        layers.check_input(x, self.model_name, MIN_SIZE)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = Stem(name="stem", **kw)(jnp.asarray(x, self.dtype), train)
        x = MixedA(pool_features=32, name="mixed0", **kw)(x, train)
        x = MixedA(pool_features=64, name="mixed1", **kw)(x, train)
        x = MixedA(pool_features=64, name="mixed2", **kw)(x, train)
        x = MixedB(name="mixed3", **kw)(x, train)
        for i, c in enumerate((128, 160, 160, 192), start=4):
            x = MixedC(channels_7x7=c, name=f"mixed{i}", **kw)(x, train)
        x = MixedD(name="mixed8", **kw)(x, train)
        x = MixedE(name="mixed9", **kw)(x, train)
        x = MixedE(name="mixed10", **kw)(x, train)
        if not self.include_top:
            return layers.global_pool(x, self.pooling)
        x = jnp.mean(x, axis=(1, 2))
        x = layers.Dropout(self.dropout_rate)(x, train)
        return nn.Dense(self.num_classes, name="head", **kw)(x)


def keras_name(path: tuple[str, ...]) -> str | None:
    """Keras layer name of the module at `path`; None where Keras names layers automatically."""
    if path == ("head",):
        return "predictions"
    return None
