"""EfficientNet B0-B7 (as `keras.applications.EfficientNetB*`) and EfficientNet-Lite0-4
(as the TensorFlow `efficientnet/lite` builder, in the layout of the lukemelas torch port).

Parameter paths: `stem/conv`, `stem/bn`, `stage{i}/block{j}/{expand_conv, expand_bn, dwconv,
bn, se_reduce, se_expand, project_conv, project_bn}`, `top/conv`, `top/bn`, `head`.
Keras names block `j` of stage `i` `block{i}{a,b,c...}`; the torch port numbers blocks
globally (`_blocks.N`).

The B models normalise inside the network as Keras does: `Rescaling(1/255)`, then
`Normalization` whose mean and variance are weights of the file, kept here as the
non-trainable `batch_stats` entries `stem/normalization/{mean,std}` (see `Normalization`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax.numpy as jnp
from flax import linen as nn

from tljax.models import layers
from tljax.models.family import Family
from tljax.models.features import tap

NUMERICS = layers.Numerics(
    bn_epsilon=1e-3,  # Keras BatchNormalization default; TF EfficientNet batch_norm_epsilon
    bn_momentum=0.99,
    bn_scale=True,
    preprocessing="raw",  # 0-255 in; Rescaling + Normalization happen inside the model
    padding="TF 'SAME' (Keras: correct_pad + 'valid' for stride 2, identical)",
)
NUMERICS_LITE = dataclasses.replace(NUMERICS, preprocessing="lite")  # (x - 127) / 128 outside
MIN_SIZE = 32
# The input normalisation's statistics (`stem/normalization`: mean, std) are constants.
FAMILY = Family("efficientnet", units=("stem", r"stage\d+", "top", "head"),
                blocks=r"stage\d+/block\d+", constants=r"stem/normalization")

# ImageNet statistics of the Keras EfficientNet Normalization layer.
IMAGENET_MEAN_RGB = (0.485, 0.456, 0.406)
IMAGENET_STDDEV_RGB = (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class StageArgs:
    kernel: int
    repeats: int
    filters_in: int
    filters_out: int
    expand_ratio: int
    stride: int
    se_ratio: float = 0.25


# Keras efficientnet.py DEFAULT_BLOCKS_ARGS (identical to the TF builder's block strings).
BLOCKS = (
    StageArgs(3, 1, 32, 16, 1, 1),
    StageArgs(3, 2, 16, 24, 6, 2),
    StageArgs(5, 2, 24, 40, 6, 2),
    StageArgs(3, 3, 40, 80, 6, 2),
    StageArgs(5, 3, 80, 112, 6, 1),
    StageArgs(5, 4, 112, 192, 6, 2),
    StageArgs(3, 1, 192, 320, 6, 1),
)


@dataclasses.dataclass(frozen=True)
class Variant:
    width: float
    depth: float
    resolution: int
    dropout: float


# (width, depth, resolution, dropout), from Keras efficientnet.py and the TF lite builder.
VARIANTS = {
    "efficientnet_b0": Variant(1.0, 1.0, 224, 0.2),
    "efficientnet_b1": Variant(1.0, 1.1, 240, 0.2),
    "efficientnet_b2": Variant(1.1, 1.2, 260, 0.3),
    "efficientnet_b3": Variant(1.2, 1.4, 300, 0.3),
    "efficientnet_b4": Variant(1.4, 1.8, 380, 0.4),
    "efficientnet_b5": Variant(1.6, 2.2, 456, 0.4),
    "efficientnet_b6": Variant(1.8, 2.6, 528, 0.5),
    "efficientnet_b7": Variant(2.0, 3.1, 600, 0.5),
    "efficientnet_lite0": Variant(1.0, 1.0, 224, 0.2),
    "efficientnet_lite1": Variant(1.0, 1.1, 240, 0.2),
    "efficientnet_lite2": Variant(1.1, 1.2, 260, 0.3),
    "efficientnet_lite3": Variant(1.2, 1.4, 280, 0.3),
    "efficientnet_lite4": Variant(1.4, 1.8, 300, 0.3),
}


def round_filters(filters: int, width: float, divisor: int = 8) -> int:
    """Channel count scaled by `width`, rounded to a multiple of `divisor` (Keras/TF rule)."""
    filters *= width
    new = max(divisor, int(filters + divisor / 2) // divisor * divisor)
    if new < 0.9 * filters:
        new += divisor
    return int(new)


def round_repeats(repeats: int, depth: float) -> int:
    return int(math.ceil(depth * repeats))


def relu6(x):
    return jnp.minimum(nn.relu(x), 6.0)


class Normalization(nn.Module):
    """Keras `Rescaling(1/255)` + `Normalization`: `(x / 255 - mean) / std`.

    `mean` and `std` come from the converted file (`std = max(sqrt(variance), 1e-7)`, times
    Keras's extra `sqrt(stddev)` rescaling for the official ImageNet files; see
    `tljax.weights.convert`). They live in `batch_stats`, constants (`FAMILY.constants`); a
    freshly initialised model uses the ImageNet statistics.
    """

    SOURCE_KIND = "normalization"  # the Keras layer class its weights are read from

    @nn.compact
    def __call__(self, x):
        mean = self.variable(
            "batch_stats", "mean", lambda: jnp.asarray(IMAGENET_MEAN_RGB, jnp.float32)
        )
        std = self.variable(
            "batch_stats", "std", lambda: jnp.asarray(IMAGENET_STDDEV_RGB, jnp.float32)
        )
        return ((x / 255.0 - mean.value) / std.value).astype(x.dtype)


class MBConv(nn.Module):
    """Keras `block`: expand 1x1, depthwise kxk, squeeze-excite, project 1x1, residual."""

    filters_in: int
    filters_out: int
    kernel: int
    stride: int
    expand_ratio: int
    se_ratio: float
    drop_rate: float
    activation: Any = nn.swish
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    numerics: layers.Numerics = NUMERICS
    keras_prefix: str = ""  # `block6a_`: its layers' Keras names, for `features=`

    def _frozen(self, train) -> bool:
        """Whether every BatchNorm layer of this block is in the frozen part of the network."""
        if not isinstance(train, layers.TrainMode):
            return False
        names = ("bn", "project_bn") + (("expand_bn",) if self.expand_ratio != 1 else ())
        return all("/".join(self.path + (n,)) in train.frozen_bn for n in names)

    @nn.compact
    def __call__(self, inputs, train: bool = False):
        conv = functools.partial(layers.Conv, padding="SAME", use_bias=False, dtype=self.dtype,
                                 param_dtype=self.param_dtype)
        norm = functools.partial(
            layers.batch_norm, self.numerics, train, self.dtype, self.param_dtype
        )
        act = self.activation
        filters = self.filters_in * self.expand_ratio
        x = inputs
        prefix = self.keras_prefix
        if self.expand_ratio != 1:
            x = layers.conv_norm(conv(filters, (1, 1), name="expand_conv"),
                               norm("expand_bn", activation=act), x)
            x = tap(prefix and prefix + "expand_activation", x)
        x = layers.DepthwiseConv(self.kernel, self.stride, self.dtype, self.param_dtype,
                                 name="dwconv")(x)
        x = tap(prefix and prefix + "activation", norm("bn", activation=act)(x))
        if 0 < self.se_ratio <= 1:
            filters_se = max(1, int(self.filters_in * self.se_ratio))
            se = jnp.mean(x, axis=(1, 2), keepdims=True)
            dense = functools.partial(
                layers.Conv, kernel_size=(1, 1), dtype=self.dtype, param_dtype=self.param_dtype
            )
            se = act(dense(filters_se, name="se_reduce")(se))
            se = nn.sigmoid(dense(filters, name="se_expand")(se))
            x = x * se
        x = layers.conv_norm(conv(self.filters_out, (1, 1), name="project_conv"),
                           norm("project_bn"), x)
        if self.stride == 1 and self.filters_in == self.filters_out:
            if self.drop_rate > 0:
                # Stochastic depth as Keras applies it: Dropout(noise_shape=(None, 1, 1, 1)),
                # i.e. drop whole samples and scale the kept ones by 1 / (1 - rate).
                # A frozen block computes what it computes at inference (Keras's
                # `base_model(x, training=False)`): no stochastic depth there.
                x = layers.Dropout(self.drop_rate, broadcast_dims=(1, 2, 3), name="drop")(
                    x, train, deterministic=self._frozen(train))
            return tap(prefix and prefix + "add", x + inputs)
        return tap(prefix and prefix + "project_bn", x)


class ConvBNAct(nn.Module):
    """The stem (3x3/2) and top (1x1) layers: convolution, BatchNorm, activation; the stem of
    the B models first normalises the 0-255 input."""

    features: int
    kernel: int
    stride: int
    activation: Any
    numerics: layers.Numerics
    normalize: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        if self.normalize:
            x = Normalization(name="normalization")(x)
        conv = layers.Conv(
            self.features, (self.kernel, self.kernel), strides=(self.stride, self.stride),
            padding="SAME", use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,
            name="conv",
        )
        x = layers.conv_norm(conv, layers.batch_norm(self.numerics, train, self.dtype,
                                                   self.param_dtype, "bn",
                                                   activation=self.activation), x)
        return tap(f"{self.name}_activation", x)


class Stage(nn.Module):
    """`repeats` MBConv blocks `block1..N`; only the first changes stride and width."""

    args: StageArgs
    repeats: int
    drop_rates: tuple[float, ...]
    activation: Any
    numerics: layers.Numerics
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    index: int = 0  # its number in the network (Keras's block{index}{a, b, ...} names)

    @nn.compact
    def __call__(self, x, train: bool = False):
        a = self.args
        for j in range(self.repeats):
            x = MBConv(
                filters_in=a.filters_in if j == 0 else a.filters_out,
                filters_out=a.filters_out,
                kernel=a.kernel,
                stride=a.stride if j == 0 else 1,
                expand_ratio=a.expand_ratio,
                se_ratio=a.se_ratio,
                drop_rate=self.drop_rates[j],
                activation=self.activation,
                numerics=self.numerics,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                keras_prefix=f"block{self.index}{chr(97 + j)}_" if self.index else "",
                name=f"block{j + 1}",
            )(x, train)
        return x


class EfficientNet(nn.Module):
    """EfficientNet (B or Lite) with the options of Keras Applications."""

    width: float
    depth: float
    lite: bool = False  # Lite: ReLU6, no squeeze-excite, unscaled stem/head and end stages
    num_classes: int = 1000
    include_top: bool = True
    pooling: str | None = None
    dropout_rate: float = 0.2
    drop_connect_rate: float = 0.2
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    model_name: str = "efficientnet"

    def stages(self) -> list[tuple[StageArgs, int]]:
        """Each stage's (scaled) arguments and number of blocks."""
        out = []
        for i, args in enumerate(BLOCKS):
            fixed = self.lite and i in (0, len(BLOCKS) - 1)
            repeats = args.repeats if fixed else round_repeats(args.repeats, self.depth)
            filters_in = round_filters(args.filters_in, self.width)
            if self.lite and i == 0:
                filters_in = 32  # the unscaled stem feeds the first stage
            out.append((dataclasses.replace(
                args,
                filters_in=filters_in,
                filters_out=round_filters(args.filters_out, self.width),
                se_ratio=0.0 if self.lite else args.se_ratio,
            ), repeats))
        return out

    @nn.compact
    def __call__(self, x, train: bool = False):
        layers.check_options(self.model_name, self.pooling, self.include_top, self.num_classes)
        layers.check_input(x, self.model_name, MIN_SIZE)
        numerics = NUMERICS_LITE if self.lite else NUMERICS
        act = relu6 if self.lite else nn.swish
        kw = dict(activation=act, numerics=numerics, dtype=self.dtype, param_dtype=self.param_dtype)
        stem_width = 32 if self.lite else round_filters(32, self.width)
        top_width = 1280 if self.lite else round_filters(1280, self.width)

        x = jnp.asarray(x, self.dtype)
        x = ConvBNAct(stem_width, 3, 2, normalize=not self.lite, name="stem", **kw)(x, train)
        stages = self.stages()
        total = float(sum(r for _, r in stages))
        b = 0
        for i, (args, repeats) in enumerate(stages, start=1):
            # Keras: block number b of all blocks gets drop_connect_rate * b / total.
            rates = tuple(self.drop_connect_rate * (b + j) / total for j in range(repeats))
            x = Stage(args, repeats, rates, index=i, name=f"stage{i}", **kw)(x, train)
            b += repeats
        x = ConvBNAct(top_width, 1, 1, name="top", **kw)(x, train)
        if not self.include_top:
            return layers.global_pool(x, self.pooling)
        x = jnp.mean(x, axis=(1, 2))
        x = layers.Dropout(self.dropout_rate)(x, train)
        return nn.Dense(
            self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype, name="head"
        )(x)


# Quarter width, half depth, no weights: squeeze-excite blocks, stochastic depth in the blocks
# with a residual (stages 4-6 have two), the head's dropout, quick to compile. For tests and
# smoke runs of the training program (as timm's `test_*` models).
TestEfficientNet = functools.partial(EfficientNet, width=0.25, depth=0.5,
                                     model_name="test_efficientnet")


def build(name: str, **options) -> EfficientNet:
    v = VARIANTS[name]
    options.setdefault("dropout_rate", v.dropout)
    return EfficientNet(
        width=v.width, depth=v.depth, lite="lite" in name, model_name=name, **options
    )


def keras_name(path: tuple[str, ...]) -> str | None:
    """Keras layer name of the module at `path` (`('stage2', 'block1', 'dwconv')` ->
    `block2a_dwconv`); None for the auto-named `Normalization` layer."""
    if path == ("head",):
        return "predictions"
    if path == ("stem", "normalization"):
        return None
    if path[0] in ("stem", "top"):
        return f"{path[0]}_{path[1]}"
    stage, block, layer = path
    return f"block{stage[5:]}{chr(96 + int(block[5:]))}_{layer}"


_TORCH_BLOCK_LAYER = {
    "expand_conv": "_expand_conv", "expand_bn": "_bn0", "dwconv": "_depthwise_conv",
    "bn": "_bn1", "se_reduce": "_se_reduce", "se_expand": "_se_expand",
    "project_conv": "_project_conv", "project_bn": "_bn2",
}


def torch_name(path: tuple[str, ...], block_index: dict[tuple[str, str], int]) -> str:
    """lukemelas torch module name of the module at `path` (`_blocks.3._depthwise_conv`).

    `block_index` maps `(stage, block)` to the global block number.
    """
    fixed = {
        ("stem", "conv"): "_conv_stem", ("stem", "bn"): "_bn0",
        ("top", "conv"): "_conv_head", ("top", "bn"): "_bn1", ("head",): "_fc",
    }
    if path in fixed:
        return fixed[path]
    stage, block, layer = path
    return f"_blocks.{block_index[(stage, block)]}.{_TORCH_BLOCK_LAYER[layer]}"
