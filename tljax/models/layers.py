"""Building blocks shared by the model families.

Numerics that depend on where a family's weights came from (BatchNorm epsilon, whether
BatchNorm has a scale, padding) are *not* decided here: each family file records them in
one `NUMERICS` object at its top and passes them in.

Padding: `lax.conv_general_dilated(padding='SAME')` pads exactly as TensorFlow does,
`pad = max((ceil(n / s) - 1) * s + k - n, 0)`, with `pad // 2` before and the rest after
(asymmetric for stride 2 on even sizes). Keras's `ZeroPadding2D(correct_pad(...))` followed
by a 'valid' convolution (EfficientNet) is the same padding, and so is the static same
padding of the lukemelas torch EfficientNets. Where Keras pads explicitly and symmetrically
(ResNet's `conv1_pad`, `pool1_pad`, the v2 `_2_pad`), the model does the same explicitly.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from tljax import ops

Dtype = Any


@dataclasses.dataclass(frozen=True)
class Numerics:
    """What a family's weights assume, in one place.

    Attributes:
      bn_epsilon: BatchNorm epsilon of the framework the weights were trained in.
      bn_momentum: running-statistics momentum, in the Keras/Flax convention
        (`new = momentum * old + (1 - momentum) * batch`).
      bn_scale: whether BatchNorm has a learned scale (Keras InceptionV3 has none).
      preprocessing: the name of the input transformation in `tljax.models.preprocessing`.
      padding: a note on how padding follows the original framework.
    """

    bn_epsilon: float
    bn_momentum: float
    bn_scale: bool
    preprocessing: str
    padding: str = "TensorFlow 'SAME' (asymmetric for stride 2), see tljax/models/layers.py"


@dataclasses.dataclass(frozen=True)
class TrainMode:
    """The `train` argument of a model, when training needs more than `train=True`.

    It is truthy (dropout and stochastic depth are active), and it says:
      frozen_bn: module paths (`stage1/block2/bn1`) of BatchNorm layers that belong to the
        frozen part of the network: they normalise with their moving statistics, as in
        inference, and leave them unchanged (the Keras convention for `trainable=False`).
        A block whose BatchNorm layers are all frozen also drops its stochastic depth, so a
        frozen backbone computes exactly its inference features (Keras's
        `base_model(x, training=False)`; the cached-feature linear probe relies on it).
      axis_name: when set, the BatchNorm layers that train compute their batch statistics
        across this named device axis (synchronised BatchNorm).
      bn_momentum: when set, replaces the family's moving-average momentum (Keras 0.99) for
        the layers that train. Fine-tuning a short run on images unlike ImageNet wants a
        lower one (0.9), or the moving statistics used at evaluation lag far behind.
      batch_axis: the named device axis the batch is split over, if any: `Dropout` numbers
        each example by its row in the global batch, so that its mask is the same however
        the batch is split.
    Hashable, so that a jitted step can take it as a static argument.
    """

    frozen_bn: frozenset[str] = frozenset()
    axis_name: str | None = None
    bn_momentum: float | None = None
    batch_axis: str | None = None

    def __bool__(self) -> bool:
        return True


class Dropout(nn.Module):
    """Dropout (`nn.Dropout`'s formula) whose mask for each example is drawn from a key of its
    own: the layer's `dropout` key folded with the example's row in the global batch. The row
    is the device's index on `train.batch_axis` (a `TrainMode`) times the per-device batch,
    plus the row on the device; without an axis, the row here. So an example's mask depends on
    the step's key and its place in the global batch, not on how many devices share the batch.
    `broadcast_dims` share the mask (1, 2, 3: whole examples, i.e. stochastic depth)."""

    rate: float
    broadcast_dims: tuple[int, ...] = ()

    @nn.compact
    def __call__(self, x, train, deterministic: bool = False):
        if not train or deterministic or self.rate == 0.0:
            return x
        if self.rate >= 1.0:
            return jnp.zeros_like(x)
        key = self.make_rng("dropout")
        n = x.shape[0]
        axis = getattr(train, "batch_axis", None)
        first = jax.lax.axis_index(axis) * n if axis else 0
        shape = tuple(1 if d in self.broadcast_dims else x.shape[d] for d in range(1, x.ndim))
        keep_prob = 1.0 - self.rate
        keep = jax.vmap(lambda row: jax.random.bernoulli(
            jax.random.fold_in(key, row), keep_prob, shape))(first + jnp.arange(n))
        return jax.lax.select(jnp.broadcast_to(keep, x.shape), x / keep_prob,
                              jnp.zeros_like(x))


class BatchNorm(nn.BatchNorm):
    """Flax's BatchNorm, followed by `activation` (None: none), that normalises with its moving
    statistics, as in inference, when its path is listed in `frozen_bn` (Keras's
    `trainable=False`). In training, float32, it computes with `tljax.ops.batch_norm_train`:
    flax's formulas, with the activation, where `ops.engine_batch_norm`."""

    training: bool = False
    frozen_bn: frozenset[str] = frozenset()
    activation: Any = None

    @property
    def inference(self) -> bool:
        """Whether this layer normalises with its moving statistics (not training, or frozen)."""
        return (not self.training) or "/".join(self.path) in self.frozen_bn

    @nn.compact
    def __call__(self, x, use_running_average=None, *, mask=None):
        if self.inference or mask is not None or self.axis_name is not None \
                or self.use_fast_variance or not self.use_bias or not self._float32(x) \
                or not ops.engine_batch_norm(x):
            y = super().__call__(x, use_running_average=self.inference, mask=mask)
            return y if self.activation is None else self.activation(y)
        c = (x.shape[-1],)
        ra_mean = self.variable("batch_stats", "mean", lambda s: jnp.zeros(s, jnp.float32), c)
        ra_var = self.variable("batch_stats", "var", lambda s: jnp.ones(s, jnp.float32), c)
        scale = self.param("scale", self.scale_init, c, self.param_dtype) if self.use_scale \
            else None
        bias = self.param("bias", self.bias_init, c, self.param_dtype)
        y, mean, var = ops.batch_norm_train(x, scale, bias, self.epsilon, self.activation)
        if not self.is_initializing():
            ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
            ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
        return y

    def _float32(self, x) -> bool:
        return (x.dtype == jnp.float32 and self.param_dtype == jnp.float32
                and self.dtype in (None, jnp.float32))

    def affine(self):
        """`(mean, mul, bias)` of this layer's inference formula, `(x - mean) * mul + bias` with
        mul = rsqrt(var + eps) * scale (flax's, in its order), from its variables; None while it
        trains, before its variables exist (at `init`) or outside float32."""
        if (not self.inference or not self.use_bias or not self.has_variable("batch_stats", "var")
                or self.param_dtype != jnp.float32 or self.dtype not in (None, jnp.float32)):
            return None
        mul = jax.lax.rsqrt(self.get_variable("batch_stats", "var") + self.epsilon)
        if self.use_scale:
            mul = mul * self.get_variable("params", "scale")
        return (self.get_variable("batch_stats", "mean"), mul,
                self.get_variable("params", "bias"))


def batch_norm(numerics: Numerics, train, dtype: Dtype, param_dtype: Dtype, name: str,
               activation=None):
    """A BatchNorm layer configured from a family's numerics (statistics kept in float32),
    followed by `activation` (a function, or None).

    `train` is a bool or a `TrainMode`.
    """
    mode = train if isinstance(train, TrainMode) else TrainMode()
    return BatchNorm(
        use_running_average=None,
        training=bool(train),
        frozen_bn=mode.frozen_bn,
        axis_name=mode.axis_name,
        momentum=numerics.bn_momentum if mode.bn_momentum is None else mode.bn_momentum,
        epsilon=numerics.bn_epsilon,
        use_scale=numerics.bn_scale,
        # Two-pass variance, mean((x - mean)^2), as TensorFlow computes it: E[x^2] - E[x]^2
        # cancels catastrophically and makes results depend on how the batch is split.
        use_fast_variance=False,
        dtype=dtype,
        param_dtype=param_dtype,
        activation=activation,
        name=name,
    )


def conv_norm(conv: Conv, norm: BatchNorm, x, *, shortcut=None, activation=None):
    """A convolution followed by a BatchNorm: `norm(conv(x))`; with a `shortcut`,
    `activation(shortcut + norm(conv(x)))` (Keras's Conv2D, BatchNormalization, Add,
    Activation), where `norm` has no activation of its own.

    A BatchNorm in inference mode is an affine map that the backend may apply inside the
    convolution (`tljax.ops.conv`'s epilogue); the numbers are the same."""
    if shortcut is not None and norm.activation is not None:
        raise ValueError("conv_norm: with a shortcut the activation comes after the add; give "
                         "it as `activation`, not as the BatchNorm's")
    act = norm.activation if shortcut is None else activation
    affine = norm.affine() if ops.fused_epilogue(norm.activation) else None
    if affine is None or x.dtype != jnp.float32:
        y = norm(conv(x))
        if shortcut is None:
            return y
        y = shortcut + y
        return y if activation is None else activation(y)
    if not ops.fused_epilogue(act):
        return act(conv(x, epilogue=ops.Epilogue(*affine, None, shortcut)))
    return conv(x, epilogue=ops.Epilogue(*affine, act, shortcut))


def global_pool(x: jnp.ndarray, pooling: str | None) -> jnp.ndarray:
    """Keras's `pooling` option: None keeps the feature map, 'avg' and 'max' pool over space."""
    if pooling is None:
        return x
    if pooling == "avg":
        return jnp.mean(x, axis=(1, 2))
    if pooling == "max":
        return jnp.max(x, axis=(1, 2))
    raise ValueError(f"pooling must be None, 'avg' or 'max', got {pooling!r}")


def check_input(x: jnp.ndarray, model: str, min_size: int) -> None:
    """Refuse inputs that are not NHWC RGB images or are smaller than the family's minimum."""
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(
            f"{model}: expected a batch of RGB images shaped (batch, height, width, 3), "
            f"got shape {tuple(x.shape)}"
        )
    height, width = x.shape[1], x.shape[2]
    if height < min_size or width < min_size:
        raise ValueError(
            f"{model}: input {height}x{width} is smaller than the minimum {min_size}x{min_size} "
            f"this architecture accepts; resize the images first"
        )


def check_options(model: str, pooling: str | None, include_top: bool, num_classes: int) -> None:
    """Validate the Keras-style options shared by every family."""
    if pooling not in (None, "avg", "max"):
        raise ValueError(f"{model}: pooling must be None, 'avg' or 'max', got {pooling!r}")
    if include_top and num_classes < 1:
        raise ValueError(
            f"{model}: num_classes must be positive with include_top, got {num_classes}"
        )


class Conv(nn.Conv):
    """`nn.Conv` for NHWC inputs, computed by `tljax.ops.conv` (same parameters and numbers), and
    optionally followed by an `epilogue` (`conv_norm`). Masks, unshared weights, 1-D kernels,
    inputs that are not 4-D and the circular, reflect or causal paddings go to `nn.Conv`."""

    @nn.compact
    def __call__(self, inputs, epilogue: ops.Epilogue | None = None):
        ks = () if isinstance(self.kernel_size, int) else tuple(self.kernel_size)
        padding = nn.linear.canonicalize_padding(self.padding, 2)
        if (inputs.ndim != 4 or len(ks) != 2 or self.mask is not None or not self.shared_weights
                or padding in ("CIRCULAR", "REFLECT", "CAUSAL")):
            y = super().__call__(inputs)
            return y if epilogue is None else epilogue(y)
        pair = lambda v: (v,) * 2 if isinstance(v, int) else tuple(v)  # noqa: E731
        strides, lhs_dilation, rhs_dilation = (
            pair(v or 1) for v in (self.strides, self.input_dilation, self.kernel_dilation))
        groups = self.feature_group_count
        kernel = self.param("kernel", self.kernel_init,
                            ks + (inputs.shape[-1] // groups, self.features), self.param_dtype)
        bias = (self.param("bias", self.bias_init, (self.features,), self.param_dtype)
                if self.use_bias else None)
        x, kernel, bias = self.promote_dtype(inputs, kernel, bias, dtype=self.dtype)
        return ops.conv(x, kernel, bias, strides, padding, lhs_dilation, rhs_dilation, groups,
                        self.precision, epilogue)


class DepthwiseConv(nn.Module):
    """A depthwise convolution, TensorFlow's 'SAME' padding, no bias (Keras's
    `DepthwiseConv2D(use_bias=False)`): the parameter of `nn.Conv(C, (k, k),
    feature_group_count=C)`, `kernel` of shape (k, k, 1, C)."""

    kernel_size: int
    strides: int = 1
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        k, c = self.kernel_size, x.shape[-1]
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (k, k, 1, c),
                            self.param_dtype)
        return ops.depthwise_conv(jnp.asarray(x, self.dtype), jnp.asarray(kernel, self.dtype),
                                  self.strides)


def max_pool(x, window: int, stride: int):
    """`nn.max_pool(x, (window, window), (stride, stride), 'VALID')`."""
    return ops.max_pool(x, window, stride)


def avg_pool_same(x, window: int):
    """`nn.avg_pool(x, (window, window), (1, 1), 'SAME', count_include_pad=False)`: stride 1,
    each output the mean of the real (unpadded) pixels of its window, as TensorFlow's 'SAME'
    average pooling; an odd `window`."""
    return ops.avg_pool_same(x, window)
