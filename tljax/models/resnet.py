"""ResNet v1 (50/101/152) and v2 (50/101/152), as `keras.applications.ResNet*`.

Parameter paths (Keras names in brackets):
- v1: `stem/conv` [conv1_conv], `stem/bn` [conv1_bn],
  `stage{s}/block{b}/conv{k}` and `bn{k}` [conv{s+1}_block{b}_{k}_conv/_bn],
  `stage{s}/block1/shortcut_conv`, `shortcut_bn` [.._0_conv/_0_bn], `head` [predictions].
- v2: `stem/conv` [conv1_conv], `stage{s}/block{b}/preact_bn` [.._preact_bn],
  `conv1`, `bn1`, `conv2`, `bn2`, `conv3`, `shortcut_conv`, then `post_bn` and `head`.
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

NUMERICS_V1 = layers.Numerics(
    bn_epsilon=1.001e-5,  # Keras resnet.py: BatchNormalization(epsilon=1.001e-5)
    bn_momentum=0.99,  # Keras default
    bn_scale=True,
    preprocessing="caffe",
    padding="explicit symmetric 3 (conv1) and 1 (pool1), TF 'SAME' for 3x3 convs, as Keras",
)
NUMERICS_V2 = layers.Numerics(
    bn_epsilon=1.001e-5,
    bn_momentum=0.99,
    bn_scale=True,
    preprocessing="tf",
    padding="explicit symmetric 3 (conv1), 1 (pool1 and each block's 3x3), as Keras",
)
MIN_SIZE = 32
FAMILY = Family("resnet", units=("stem", r"stage\d+", "post_bn", "head"),
                blocks=r"stage\d+/block\d+")
DEFAULT_SIZE = 224
STAGE_WIDTHS = (64, 128, 256, 512)


class BottleneckV1(nn.Module):
    """Keras `residual_block_v1`: the stride sits on the first 1x1 convolution."""

    filters: int
    stride: int
    conv_shortcut: bool
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        conv = functools.partial(layers.Conv, dtype=self.dtype, param_dtype=self.param_dtype)
        norm = functools.partial(
            layers.batch_norm, NUMERICS_V1, train, self.dtype, self.param_dtype
        )
        s = (self.stride, self.stride)
        if self.conv_shortcut:
            shortcut = layers.conv_norm(
                conv(4 * self.filters, (1, 1), strides=s, name="shortcut_conv"),
                norm("shortcut_bn"), x)
        else:
            shortcut = x
        y = layers.conv_norm(conv(self.filters, (1, 1), strides=s, name="conv1"),
                             norm("bn1", activation=nn.relu), x)
        y = conv(self.filters, (3, 3), padding="SAME", name="conv2")(y)
        y = norm("bn2", activation=nn.relu)(y)
        # conv3, bn3, then Add([shortcut, y]) and ReLU.
        return layers.conv_norm(conv(4 * self.filters, (1, 1), name="conv3"), norm("bn3"), y,
                                shortcut=shortcut, activation=nn.relu)


class BottleneckV2(nn.Module):
    """Keras `residual_block_v2`: pre-activation, the stride sits on the 3x3 convolution."""

    filters: int
    stride: int
    conv_shortcut: bool
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        conv = functools.partial(layers.Conv, dtype=self.dtype, param_dtype=self.param_dtype)
        norm = functools.partial(
            layers.batch_norm, NUMERICS_V2, train, self.dtype, self.param_dtype
        )
        preact = norm("preact_bn", activation=nn.relu)(x)
        if self.conv_shortcut:
            shortcut = conv(
                4 * self.filters, (1, 1), strides=(self.stride, self.stride), name="shortcut_conv"
            )(preact)
        else:
            # Keras: MaxPooling2D(1, strides=stride), i.e. subsampling.
            shortcut = x[:, :: self.stride, :: self.stride, :] if self.stride > 1 else x
        y = conv(self.filters, (1, 1), use_bias=False, name="conv1")(preact)
        y = norm("bn1", activation=nn.relu)(y)
        y = conv(
            self.filters, (3, 3), strides=(self.stride, self.stride), padding=((1, 1), (1, 1)),
            use_bias=False, name="conv2",
        )(y)
        y = norm("bn2", activation=nn.relu)(y)
        y = conv(4 * self.filters, (1, 1), name="conv3")(y)
        return shortcut + y


class Stem(nn.Module):
    """conv1 (7x7/2 on a 3-pixel symmetric pad) [+ BN + ReLU for v1], then 3x3/2 max pool."""

    preact: bool
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = layers.Conv(
            64, (7, 7), strides=(2, 2), padding=((3, 3), (3, 3)), dtype=self.dtype,
            param_dtype=self.param_dtype, name="conv",
        )(x)
        if not self.preact:
            x = tap("conv1_relu", layers.batch_norm(NUMERICS_V1, train, self.dtype,
                                                    self.param_dtype, "bn", activation=nn.relu)(x))
        # Keras pads with zeros (pool1_pad) before pooling; after a ReLU (v1) zeros never win,
        # but v2 pools pre-activation values, so pad with zeros exactly as Keras does.
        x = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
        return tap("pool1_pool", layers.max_pool(x, 3, 2))


class Stage(nn.Module):
    """`n` bottleneck blocks named `block1..n`; the first has the projection shortcut."""

    n: int
    filters: int
    stride: int
    preact: bool
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    index: int = 0  # its number in the network: Keras names its blocks conv{index + 1}_...

    @nn.compact
    def __call__(self, x, train: bool = False):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        for b in range(1, self.n + 1):
            if self.preact:
                # Keras stack_residual_blocks_v2: the stride is on the stage's *last* block.
                stride = self.stride if b == self.n else 1
                block = BottleneckV2(self.filters, stride, b == 1, name=f"block{b}", **kw)
            else:
                stride = self.stride if b == 1 else 1
                block = BottleneckV1(self.filters, stride, b == 1, name=f"block{b}", **kw)
            x = tap(f"conv{self.index + 1}_block{b}_out" if self.index else "", block(x, train))
        return x


class ResNet(nn.Module):
    """ResNet v1 or v2 with the options of Keras Applications."""

    stage_sizes: Sequence[int]
    preact: bool = False  # True for ResNet v2
    num_classes: int = 1000
    include_top: bool = True
    pooling: str | None = None
    dropout_rate: float = 0.0  # Keras ResNets have none; offered for fine-tuning heads.
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    model_name: str = "resnet"

    @nn.compact
    def __call__(self, x, train: bool = False):
        layers.check_options(self.model_name, self.pooling, self.include_top, self.num_classes)
        layers.check_input(x, self.model_name, MIN_SIZE)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = Stem(self.preact, name="stem", **kw)(jnp.asarray(x, self.dtype), train)
        last = len(self.stage_sizes)
        for s, (n, width) in enumerate(zip(self.stage_sizes, STAGE_WIDTHS, strict=True), start=1):
            if self.preact:
                stride = 1 if s == last else 2  # v2: no stride in the last stage
            else:
                stride = 1 if s == 1 else 2  # v1: no stride in the first stage
            x = Stage(n, width, stride, self.preact, index=s, name=f"stage{s}", **kw)(x, train)
        if self.preact:
            x = layers.batch_norm(NUMERICS_V2, train, name="post_bn", activation=nn.relu, **kw)(x)
            x = tap("post_relu", x)
        if not self.include_top:
            return layers.global_pool(x, self.pooling)
        x = jnp.mean(x, axis=(1, 2))
        x = layers.Dropout(self.dropout_rate)(x, train)
        return nn.Dense(self.num_classes, name="head", **kw)(x)


ResNet50 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), model_name="resnet50")
ResNet101 = functools.partial(ResNet, stage_sizes=(3, 4, 23, 3), model_name="resnet101")
ResNet152 = functools.partial(ResNet, stage_sizes=(3, 8, 36, 3), model_name="resnet152")
ResNet50V2 = functools.partial(ResNet50, preact=True, model_name="resnet50_v2")
ResNet101V2 = functools.partial(ResNet101, preact=True, model_name="resnet101_v2")
ResNet152V2 = functools.partial(ResNet152, preact=True, model_name="resnet152_v2")
# One block per stage, no weights: real BatchNorm and the same paths, quick to compile. For
# tests and smoke runs of the training program (as timm's `test_*` models).
TestResNet = functools.partial(ResNet, stage_sizes=(1, 1, 1, 1), model_name="test_resnet")

_BLOCK_LAYER = {
    "conv1": "1_conv", "bn1": "1_bn", "conv2": "2_conv", "bn2": "2_bn", "conv3": "3_conv",
    "bn3": "3_bn", "shortcut_conv": "0_conv", "shortcut_bn": "0_bn", "preact_bn": "preact_bn",
}


def keras_name(path: tuple[str, ...]) -> str:
    """Keras layer name of the Flax module at `path`.

    `('stage1', 'block2', 'conv3')` -> `conv2_block2_3_conv`; `('stem', 'conv')` -> `conv1_conv`.
    """
    if path == ("head",):
        return "predictions"
    if path == ("post_bn",):
        return "post_bn"
    if path[0] == "stem":
        return f"conv1_{path[1]}"
    stage, block, layer = path
    return f"conv{int(stage[5:]) + 1}_{block}_{_BLOCK_LAYER[layer]}"
