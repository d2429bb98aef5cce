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

import contextlib
import contextvars
import dataclasses
import functools
import operator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from jax.custom_derivatives import SymbolicZero

from tljax.native import batchnorm as native_batchnorm
from tljax.native import build as native_build
from tljax.native import conv as native_conv
from tljax.native import depthwise as native_depthwise
from tljax.native import pool as native_pool
from tljax.varying import varying_like

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
    """Flax BatchNorm that runs in inference mode when its path is listed as frozen, followed by
    `activation` (None: none). Training on CPU in float32 without a device axis: flax's numbers
    with a hand-written gradient (`bn_train`; `cpu_rewrites`), or, where the C++ kernels are
    built, BatchNorm and a ReLU or SiLU activation in two fused kernels
    (`tljax.native.batchnorm`)."""

    training: bool = False
    frozen_bn: frozenset[str] = frozenset()
    activation: Any = None

    @nn.compact
    def __call__(self, x, use_running_average=None, *, mask=None, fold=False):
        """`fold=True`: for `conv_bn`, `x` only gives the channels and dtype of the input to
        come; returns `(mean, mul, bias)` of flax's inference formula where this layer runs in
        inference mode on CPU in float32 with the C++ product built and its activation is
        one the product applies (`native_batchnorm.ACTIVATIONS`), else None."""
        frozen = "/".join(self.path) in self.frozen_bn
        inference = (not self.training) or frozen
        if fold:
            foldable = (inference and mask is None and self.use_bias and self._float32(x)
                        and self.activation in native_batchnorm.ACTIVATIONS
                        and native_conv.direct_available())
            return self._fold(x.shape[-1]) if foldable else None
        if (inference or mask is not None or self.axis_name is not None
                or self.use_fast_variance or not self.use_bias or not self._float32(x)):
            y = super().__call__(x, use_running_average=inference, mask=mask)
            return y if self.activation is None else self.activation(y)
        return self._train_float32(x)

    def _float32(self, x) -> bool:
        """On CPU (`cpu_rewrites`), float32 in, float32 parameters and computation."""
        return (x.dtype == jnp.float32 and self.param_dtype == jnp.float32
                and self.dtype in (None, jnp.float32) and cpu_rewrites())

    def _fold(self, channels: int):
        """flax's inference BatchNorm as `(mean, mul, bias)`: `(y - mean) * mul + bias`, mul =
        rsqrt(var + eps) * scale, from the same variables flax's BatchNorm keeps."""
        c = (channels,)
        ra_mean = self.variable("batch_stats", "mean", lambda s: jnp.zeros(s, jnp.float32), c)
        ra_var = self.variable("batch_stats", "var", lambda s: jnp.ones(s, jnp.float32), c)
        mul = jax.lax.rsqrt(ra_var.value + self.epsilon)
        if self.use_scale:
            mul = mul * self.param("scale", self.scale_init, c, self.param_dtype)
        return ra_mean.value, mul, self.param("bias", self.bias_init, c, self.param_dtype)

    def _train_float32(self, x):
        """Training mode on CPU, float32: flax's numbers (two-pass variance, the same
        formulas in the same order) with a hand-written gradient (`_bn_train_bwd`), or the
        C++ kernels with the activation fused (`native_batchnorm.bn_act`)."""
        c = (x.shape[-1],)
        ra_mean = self.variable("batch_stats", "mean", lambda s: jnp.zeros(s, jnp.float32), c)
        ra_var = self.variable("batch_stats", "var", lambda s: jnp.ones(s, jnp.float32), c)
        scale = self.param("scale", self.scale_init, c, self.param_dtype) if self.use_scale \
            else None
        bias = self.param("bias", self.bias_init, c, self.param_dtype)
        scale, bias = varying_like(x, scale, bias)
        act = self.activation
        if native_build.available():
            fused = act if act in native_batchnorm.ACTIVATIONS else None
            y, mean, var = native_batchnorm.bn_act(x, scale, bias, self.epsilon, fused)
            act = None if fused is act else act
        else:
            y, mean, var = bn_train(x, scale, bias, self.epsilon)
        if not self.is_initializing():
            ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
            ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
        return y if act is None else act(y)


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


class Epilogue(NamedTuple):
    """What `Conv(epilogue=...)` applies to its output: `native_conv.batch_norm_formula`."""
    mean: Any
    mul: Any
    bias: Any
    act: Any = None
    residual: Any = None


def conv_bn(conv: Conv, norm: BatchNorm, x, residual=None, activation=None):
    """`norm(conv(x))`, or with a `residual`, `activation(residual + norm(conv(x)))` (a norm
    without an activation of its own: ResNet's last BatchNorm, shortcut add and ReLU); the
    same numbers. Where `norm` is in inference mode (`train=False`, or frozen) on CPU with the
    C++ kernels built, it is folded into `conv` (`Conv(epilogue=...)`): for a 1x1 convolution
    the conv bias, the BatchNorm, the residual and the activation are applied to each tile of
    the C++ product in registers instead of in passes over its output. EfficientNet-B0 and
    ResNet50 inference at 112x112: see docs/benchmarks.md."""
    if residual is not None and norm.activation is not None:
        raise ValueError("conv_bn: with a residual the activation comes after the add; give it "
                         "as `activation`, not as the BatchNorm's")
    fold = norm(jax.ShapeDtypeStruct((conv.features,), x.dtype), fold=True)
    if fold is None:
        y = norm(conv(x))
        if residual is None:
            return y
        y = residual + y
        return y if activation is None else activation(y)
    act = norm.activation if residual is None else activation
    if act not in native_batchnorm.ACTIVATIONS:
        y = conv(x, epilogue=Epilogue(*fold, None, residual))
        return act(y)
    return conv(x, epilogue=Epilogue(*fold, act, residual))


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


_PLAIN = contextvars.ContextVar("tljax_plain_convolutions", default=False)


@contextlib.contextmanager
def plain_convolutions(enabled: bool = True):
    """Within this block, models traced on CPU use XLA's convolution ops, as on accelerators,
    instead of the CPU rewrites (`cpu_rewrites`). For comparisons and counting: the benchmark
    counts model FLOPs on this form, the same program on every backend. It changes how a
    program is traced, so trace (not only call) inside the block; a function that `jax.jit`
    already traced outside it keeps its cached form."""
    token = _PLAIN.set(enabled)
    try:
        yield
    finally:
        _PLAIN.reset(token)


def cpu_rewrites() -> bool:
    """Whether layers are written as the cheaper ops XLA:CPU runs faster: 1x1 convolutions as
    matrix products (`Conv`; XLA's convolutions, and above all their weight gradients, run
    several times below its matmul rate), depthwise convolutions as C++ kernels or shifted
    multiply-adds (`DepthwiseConv`; its grouped convolutions are slower still), max and
    average pooling as shifted maxima and sums (`max_pool`, `avg_pool_same`), and training
    BatchNorm as C++ kernels or with a hand-written gradient (`BatchNorm`, `bn_train`); every
    one gives the same numbers (tests/test_layers.py). True on CPU unless
    `plain_convolutions()` is active; accelerators run XLA's ops (cuDNN)."""
    return jax.default_backend() == "cpu" and not _PLAIN.get()


class Conv(nn.Conv):
    """`nn.Conv`, same parameters and results, for NHWC inputs, written where `cpu_rewrites()`
    as what XLA:CPU runs faster:
    - a 1x1 convolution as the matrix product it is (a strided slice, then a contraction over
      channels). XLA:CPU lowers a 1x1 convolution to its convolution kernels; as a
      `dot_general` it reaches the matmul rate instead. ResNet50's 1x1 layers at batch 16
      (docs/benchmarks.md): forward 1.5-5x and forward + both gradients 2-11x faster. The
      forward is the C++ product (`tljax.native.conv.matmul`) where that is faster still
      (`_product`), and with an `epilogue` (`conv_bn`) the BatchNorm after it is applied to
      the product's tiles in registers.
    - a larger float32 kernel with the C++ kernels built: `tljax.native.conv`, the C++ direct
      convolution and kernel gradient (AVX-512), the input gradient at stride 1 from the
      flipped and transposed kernel; 5-10% faster whole steps (docs/benchmarks.md).
    Anything else (dilations, groups, other dtypes) runs XLA's convolution with
    the arguments `nn.Conv` gives it; masks, unshared weights, inputs that are not 4-D and
    the circular, reflect or causal paddings go to `nn.Conv` itself.
    """

    @nn.compact
    def __call__(self, inputs, epilogue: Epilogue | None = None):
        """`epilogue`: an inference BatchNorm, a residual and an activation (`conv_bn`),
        applied to the output as `native_conv.batch_norm_formula`: by the C++ product's tiles
        where the convolution is one (1x1), else after it."""
        y, fused = self._convolve(inputs, epilogue)
        if epilogue is None or fused:
            return y
        return native_conv.batch_norm_formula(y, *epilogue)

    def _convolve(self, inputs, epilogue):
        """The output, and whether `epilogue` is applied to it already."""
        # An int kernel_size is a 1-D convolution to nn.Conv: left to it.
        ks = () if isinstance(self.kernel_size, int) else tuple(self.kernel_size)
        pair = lambda v: (v,) * 2 if isinstance(v, int) else tuple(v)  # noqa: E731
        strides, lhs_dilation, rhs_dilation = (
            pair(v or 1) for v in (self.strides, self.input_dilation, self.kernel_dilation))
        padding = nn.linear.canonicalize_padding(self.padding, 2)
        if (inputs.ndim != 4 or len(ks) != 2 or self.mask is not None or not self.shared_weights
                or padding in ("CIRCULAR", "REFLECT", "CAUSAL")):
            return super().__call__(inputs), False
        groups = self.feature_group_count
        kernel = self.param("kernel", self.kernel_init,
                            ks + (inputs.shape[-1] // groups, self.features), self.param_dtype)
        bias = (self.param("bias", self.bias_init, (self.features,), self.param_dtype)
                if self.use_bias else None)
        x, kernel, bias = self.promote_dtype(inputs, kernel, bias, dtype=self.dtype)
        plain = (groups == 1 and lhs_dilation == rhs_dilation == (1, 1) and cpu_rewrites())
        if plain and isinstance(padding, str):  # 'SAME' or 'VALID' as the pads XLA would use
            padding = [_same_padding(n, k, s) if padding == "SAME" else (0, 0)
                       for n, k, s in zip(x.shape[1:3], ks, strides, strict=True)]
        if plain and ks == (1, 1) and all(tuple(p) == (0, 0) for p in padding):
            x = x[:, ::strides[0], ::strides[1], :]
            if epilogue is not None and _native_product(x, kernel[0, 0]):
                e = epilogue
                k, mean, mul, b, conv_bias = varying_like(x, kernel[0, 0], e.mean, e.mul, e.bias,
                                                          bias)
                return native_conv.matmul_bn(x, k, mean, mul, b, e.act, conv_bias=conv_bias,
                                             residual=e.residual), True
            y = pointwise(x, *varying_like(x, kernel[0, 0]), self.precision)
        elif (plain and x.dtype == jnp.float32 and native_conv.supports(ks, padding)
              and native_build.available()):
            y = native_conv.conv(x, *varying_like(x, kernel), padding, strides, self.precision)
        else:
            y = jax.lax.conv_general_dilated(
                x, kernel, strides, padding, lhs_dilation=lhs_dilation,
                rhs_dilation=rhs_dilation, dimension_numbers=("NHWC", "HWIO", "NHWC"),
                feature_group_count=groups, precision=self.precision)
        return (y if bias is None else y + bias), False


def _pointwise(x, kernel, precision):
    """(N, H, W, C) x (C, F) -> (N, H, W, F): the contraction over channels."""
    return _product(x, kernel, precision)


# Where the C++ product (`tljax.native.conv.matmul`) beats XLA:CPU's dot: a kernel of at most
# 2**19 floats (2 MiB), or at least 2048 rows. Measured against XLA's dot, both alternating in
# one process (docs/benchmarks.md): EfficientNet-B0's 1x1 layers 6-68% faster (24 -> 144 at
# 28x28: 1.13 -> 0.68 ms), ResNet50's 3-11% at most shapes; XLA stays faster (by 2-7%) on
# ResNet's (1024, 2048) and (2048, 512) layers with a few hundred rows.
_NATIVE_PRODUCT_KERNEL = 2**19
_NATIVE_PRODUCT_ROWS = 2048


def _native_product(x, kernel) -> bool:
    """Whether `x` (..., C) times `kernel` (C, F) runs the C++ product."""
    rows = x.size // x.shape[-1]
    return (x.dtype == kernel.dtype == jnp.float32 and cpu_rewrites()
            and native_conv.direct_available()
            and (kernel.size <= _NATIVE_PRODUCT_KERNEL or rows >= _NATIVE_PRODUCT_ROWS))


def _product(x, kernel, precision):
    """`x` (..., C) times `kernel` (C, F): the C++ product where it is faster, else XLA's dot."""
    if _native_product(x, kernel):
        return native_conv.matmul(x, kernel)
    return jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())), precision=precision)


def _pointwise_bwd(precision, res, dy):
    """Input gradient dy kernel^T; kernel gradient x^T dy over the flattened batch and space:
    - where F < C and F >= 64 (ResNet's and EfficientNet's reducing 1x1 layers) and the C++
      direct convolution is built, its kernel gradient (`tljax.native.conv.kernel_grad`). It
      re-reads dy once per 48 input channels, cheap when dy is the smaller side, and below 64
      output channels its tiles run partly empty. (12544, 256) x (12544, 64): 4.8 -> 4.0 ms;
      (784, 1024) x (784, 256): 3.0 -> 2.5 ms; ResNet50 full step at 112: 618 -> 591 ms.
    - else the product with the smaller of C and F as its rows. Autodiff's x^T dy contracts
      the long leading axis of both operands; written as (dy^T x)^T it once ran without a
      copy of dy into a transposed layout (whole train step at 112x112, batch 16: ResNet50
      1190 -> 948 ms, EfficientNet-B0 351 -> 312 ms; docs/benchmarks.md). XLA now folds that
      transpose into the product, which then has C rows; with F < C the (F, C) product is
      faster, and its transpose is taken by the C++ kernel, which XLA cannot fold: at
      (12544, 256) x (12544, 64) 5.0 -> 3.6 ms, at (3136, 512) x (3136, 128) 4.5 -> 3.1 ms."""
    x, kernel = res
    # XLA's dot: the C++ product here made EfficientNet-B0's full step 6% slower.
    dx = jax.lax.dot_general(dy, kernel, (((3,), (1,)), ((), ())), precision=precision)
    c, f = kernel.shape
    if c > f >= 64 and x.ndim == 4 and x.dtype == jnp.float32 and native_conv.direct_available():
        dk = native_conv.kernel_grad(x, dy, kernel[None, None], ((0, 0), (0, 0)))
        return dx, dk[0, 0]
    x2, dy2 = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
    dk_t = jnp.matmul(dy2.T, x2, precision=precision)
    if dy2.shape[1] < x2.shape[1] and dk_t.dtype == jnp.float32 and native_build.available():
        return dx, native_conv.transpose(dk_t)
    return dx, dk_t.T


def _make_pointwise():
    f = jax.custom_vjp(_pointwise, nondiff_argnums=(2,))
    f.defvjp(lambda x, kernel, precision: (_pointwise(x, kernel, precision), (x, kernel)),
             _pointwise_bwd)
    return f


# A 1x1 convolution as the matrix product it is, with the gradients of `_pointwise_bwd`.
pointwise = _make_pointwise()


def _sum(terms):
    """`t0 + t1 + ...`, added left to right: one elementwise expression that XLA fuses into a
    single pass (the shifted multiply-adds below are all written this way)."""
    return functools.reduce(operator.add, terms)


def _same_padding(n: int, k: int, s: int) -> tuple[int, int]:
    pad = max((-(-n // s) - 1) * s + k - n, 0)
    return pad // 2, pad - pad // 2


class DepthwiseConv(nn.Module):
    """A depthwise convolution ('SAME' padding as TensorFlow, no bias) written as the k*k
    shifted multiply-adds it is.

    Same parameter as `nn.Conv(C, (k, k), feature_group_count=C)`: `kernel` of shape
    (k, k, 1, C). XLA:CPU runs `feature_group_count` convolutions, and above all their
    gradients, far slower than these elementwise loops, which it fuses (measured in
    docs/benchmarks.md); the gradients are written by hand in the same form (`_taps_bwd`).
    Faster still, in float32 on CPU: the same sums as C++ kernels (`tljax.native.depthwise`),
    one pass each for the forward and both gradients, where `tljax.native.build.available()`
    (a C++ compiler, and not `TLJAX_NATIVE=0`). On accelerators `nn.Conv` is used
    (`use_conv=True`).
    """

    kernel_size: int
    strides: int = 1
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    use_conv: bool = False

    @nn.compact
    def __call__(self, x):
        k, s, c = self.kernel_size, self.strides, x.shape[-1]
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (k, k, 1, c),
                            self.param_dtype)
        x = jnp.asarray(x, self.dtype)
        kernel = jnp.asarray(kernel, self.dtype)
        if self.use_conv:
            return jax.lax.conv_general_dilated(
                x, kernel, (s, s), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
                feature_group_count=c)
        if x.dtype == jnp.float32 and cpu_rewrites() and native_build.available():
            padding = (_same_padding(x.shape[1], k, s), _same_padding(x.shape[2], k, s))
            return native_depthwise.depthwise(x, *varying_like(x, kernel), s, padding)
        return depthwise_taps(x, *varying_like(x, kernel), s)


def _taps(x, kernel, s: int):
    """The forward multiply-adds: 'SAME' padding as TensorFlow, stride `s`."""
    k = kernel.shape[0]
    return _sum(window * kernel[n // k, n % k, 0]
                for n, window in enumerate(_same_windows(x, k, s)))


def _taps_fwd(x, kernel, s):
    return _taps(x, kernel, s), (x, kernel)


def _taps_bwd(s, res, dy):
    """Both gradients in the forward's own form, a few fused passes (docs/benchmarks.md),
    computed phase by phase: at stride `s` the padded input splits into s*s phases (the
    positions congruent to (a, b) mod s), each of which meets only the taps congruent to it.

    Input: in each phase, a correlation of dy with that phase's taps, then the phases
    interleaved; autodiff's transpose is instead a sum of k*k padded copies of dy with
    interior padding (s*s times the multiply-adds, most of them by zero), which XLA fuses
    into, and recomputes in, each consumer. Kernel: each tap's window, a contiguous slice of
    its phase, times dy summed over batch and space (`_tap_sums`); strided windows of the
    padded input read s*s times the memory. Stride 1 is the one-phase case."""
    x, kernel = res
    return _phase_dx(dy, kernel, x.shape[1], x.shape[2], s), _phase_dk(x, dy, kernel, s)


def _phase_rows(n: int, k: int, s: int):
    """For one spatial axis of length `n`: (output length, padding before, the phase index
    range [u0, u1) that covers the unpadded input, phase length covering every tap)."""
    o = -(-n // s)
    p0 = _same_padding(n, k, s)[0]
    return o, p0, p0 // s, -(-(p0 + n) // s), -(-((o - 1) * s + k) // s)


def _same_windows(x, k: int, s: int):
    """The k*k windows of `x` padded 'SAME' as TensorFlow, at stride `s`, in row-major order,
    each the output's shape: contiguous slices of the s*s phases of the padded input (the
    positions congruent to (a, b) mod s), which the kernel gradient reads s*s times faster
    than strided slices (docs/benchmarks.md). Stride 1: slices of the padded input."""
    n, h, w, c = x.shape
    oh, pt, _, _, ph = _phase_rows(h, k, s)
    ow, pl, _, _, pw = _phase_rows(w, k, s)
    xp = jnp.pad(x, ((0, 0), (pt, ph * s - h - pt), (pl, pw * s - w - pl), (0, 0)))
    phases = xp.reshape(n, ph, s, pw, s, c).transpose(2, 4, 0, 1, 3, 5)
    return [phases[i % s, j % s, :, i // s:i // s + oh, j // s:j // s + ow]
            for i in range(k) for j in range(k)]


def _phase_dk(x, dy, kernel, s: int):
    k = kernel.shape[0]
    return _tap_sums(_same_windows(x, k, s), dy).reshape(kernel.shape).astype(kernel.dtype)


def _phase_dx(dy, kernel, h: int, w: int, s: int):
    """dx[r] = sum over taps i with r + pad = o*s + i of kernel[i] * dy[o], for each phase
    a = (r + pad) mod s a correlation of dy with the taps i = a + s*d, over the phase
    positions u0 <= u < u1 that cover the input, then cropped to it."""
    k = kernel.shape[0]
    oh, pt, u0, u1, _ = _phase_rows(h, k, s)
    ow, pl, v0, v1, _ = _phase_rows(w, k, s)
    n, c = dy.shape[0], dy.shape[-1]
    d = -(-k // s) - 1  # the most taps a phase meets along an axis, less one
    ft, fl = max(0, d - u0), max(0, d - v0)
    dyp = jnp.pad(dy, ((0, 0), (ft, max(0, u1 - oh)), (fl, max(0, v1 - ow)), (0, 0)))
    rows = []
    for a in range(s):
        cols = []
        for b in range(s):
            taps = [(di, dj) for di in range(-(-(k - a) // s)) for dj in range(-(-(k - b) // s))]
            cols.append(_sum(dyp[:, u0 - di + ft:u1 - di + ft, v0 - dj + fl:v1 - dj + fl]
                             * kernel[a + s * di, b + s * dj, 0] for di, dj in taps)
                        if taps else jnp.zeros((n, u1 - u0, v1 - v0, c), dy.dtype))  # k < s
        rows.append(jnp.stack(cols, 3))
    dx = jnp.stack(rows, 2).reshape(n, (u1 - u0) * s, (v1 - v0) * s, c)
    return dx[:, pt - u0 * s:pt - u0 * s + h, pl - v0 * s:pl - v0 * s + w]


def _tap_sums(windows, dy, groups: int = 16):
    """(k*k, C): each window times dy, summed over batch and space, in float32.

    The batch is split into up to `groups` equal slices whose products are added as one
    elementwise expression, which XLA fuses into a single pass per tap that reads the window and
    dy once and writes a 1/`groups` partial sum; the small sum over the rest follows. XLA:CPU's
    reductions over the leading axes (and the products with a vector of ones used before) wrote
    each tap's product out first and ran 2-4x slower per layer (docs/benchmarks.md)."""
    n = dy.shape[0]
    g = max(d for d in range(1, min(n, groups) + 1) if n % d == 0)
    m = n // g
    dy = dy.astype(jnp.float32)
    windows = [window.astype(jnp.float32) for window in windows]
    sums = [_sum(window[i * m:(i + 1) * m] * dy[i * m:(i + 1) * m] for i in range(g))
            for window in windows]
    return jnp.stack(sums).sum((1, 2, 3))


def _depthwise_taps():
    f = jax.custom_vjp(_taps, nondiff_argnums=(2,))
    f.defvjp(_taps_fwd, _taps_bwd)
    return f


# A depthwise convolution (N, H, W, C) x (k, k, 1, C) -> (N, H', W', C), 'SAME' padding, as
# k*k multiply-adds, with the gradients of `_taps_bwd`.
depthwise_taps = _depthwise_taps()


def max_pool(x, window: int, stride: int):
    """`nn.max_pool(x, (window, window), (stride, stride), 'VALID')`, the same maxima; on CPU
    written as the window*window shifted maxima it is, with the gradient of `_max_taps_bwd`
    (XLA:CPU's `select_and_scatter`, the gradient autodiff writes for `reduce_window`, is
    several times slower: docs/benchmarks.md). Overlapping float32 windows (ResNet's and
    InceptionV3's 3x3 at stride 2) go to the C++ kernels of `tljax.native.pool` where they are
    built: in a whole train step XLA fused the shifted form's gradient into a ~110 ms pass
    for ResNet50's stem pool at 224 (full step 2258 -> 2181 ms; InceptionV3 at 160, 718 ->
    685). VGG's 2x2 windows at stride 2 do not overlap, and there the shifted form is faster."""
    if not cpu_rewrites():
        return nn.max_pool(x, (window, window), strides=(stride, stride), padding="VALID")
    if (window > stride and x.ndim == 4 and x.dtype == jnp.float32
            and native_build.available()):
        return native_pool.max_pool(x, window, stride)
    return max_taps(x, window, stride)


def _windows(x, k: int, s: int):
    """The k*k 'VALID' windows of `x` at stride `s`, in row-major window order, each the
    output's shape."""
    oh, ow = (x.shape[1] - k) // s + 1, (x.shape[2] - k) // s + 1
    return [x[:, i:i + s * (oh - 1) + 1:s, j:j + s * (ow - 1) + 1:s, :]
            for i in range(k) for j in range(k)]


def _max_taps(x, k: int, s: int):
    return functools.reduce(jnp.maximum, _windows(x, k, s))


def _max_taps_fwd(x, k, s):
    out = _max_taps(x, k, s)
    return out, (x, out)


def _max_taps_bwd(k, s, res, dy):
    """Each output's gradient goes to the first input of its window (row-major order) that
    equals the maximum, as `select_and_scatter` does for `reduce_window` max (and TensorFlow's
    MaxPoolGrad): the same choice, ties included (where windows overlap, an input's shares add
    up in another order: last-bit differences). Each tap's share is placed back at its
    strided positions by padding (the transpose of the strided slice); the k*k padded arrays
    add up in one fused pass."""
    x, out = res
    h, w = x.shape[1], x.shape[2]
    oh, ow = out.shape[1], out.shape[2]
    zero = jnp.zeros((), dy.dtype)
    taken = None
    dx = None
    for n, window in enumerate(_windows(x, k, s)):
        i, j = divmod(n, k)
        hit = window == out
        if taken is not None:
            hit = hit & ~taken
        taken = hit if taken is None else taken | hit
        share = jax.lax.pad(jnp.where(hit, dy, zero), zero,
                            ((0, 0, 0), (i, h - i - s * (oh - 1) - 1, s - 1),
                             (j, w - j - s * (ow - 1) - 1, s - 1), (0, 0, 0)))
        dx = share if dx is None else dx + share
    return (dx,)


def _make_max_taps():
    f = jax.custom_vjp(_max_taps, nondiff_argnums=(1, 2))
    f.defvjp(_max_taps_fwd, _max_taps_bwd)
    return f


# 'VALID' max pooling (N, H, W, C) -> (N, H', W', C), window k, stride s, as k*k maxima, with
# the gradient of `_max_taps_bwd`.
max_taps = _make_max_taps()


def avg_pool_same(x, window: int):
    """`nn.avg_pool(x, (window, window), (1, 1), 'SAME', count_include_pad=False)`: stride 1,
    each output the mean of the real (unpadded) pixels of its window, as TensorFlow's 'SAME'
    average pooling; an odd `window`. On CPU written as the window*window shifted sums it is
    (the same numbers as XLA's `reduce_window`, several times faster: docs/benchmarks.md), with
    a gradient of the same form: the window is symmetric, so the transpose of its box sum is the
    box sum of the cotangent divided by the counts."""
    if window % 2 != 1:
        raise ValueError(f"avg_pool_same takes an odd window, got {window}")
    if not cpu_rewrites():
        return nn.avg_pool(x, (window, window), strides=(1, 1), padding="SAME",
                           count_include_pad=False)
    return mean_taps(x, window)


def _box_sum(x, k: int):
    """Sums over the k*k window around each pixel (zero padding, odd k), in row-major order."""
    return _sum(_same_windows(x, k, 1))


def _inverse_counts(h: int, w: int, k: int, dtype):
    """1 / the number of real pixels in each k*k 'SAME' window of an h x w map (a constant)."""
    p = k // 2
    ones = np.pad(np.ones((h, w)), p)
    counts = sum(ones[i:i + h, j:j + w] for i in range(k) for j in range(k))
    return jnp.asarray((1.0 / counts)[None, :, :, None], dtype)


def _mean_taps(x, k: int):
    return _box_sum(x, k) * _inverse_counts(x.shape[1], x.shape[2], k, x.dtype)


def _mean_taps_bwd(k, _, dy):
    return (_box_sum(dy * _inverse_counts(dy.shape[1], dy.shape[2], k, dy.dtype), k),)


def _make_mean_taps():
    f = jax.custom_vjp(_mean_taps, nondiff_argnums=(1,))
    f.defvjp(lambda x, k: (_mean_taps(x, k), None), _mean_taps_bwd)
    return f


# Stride-1 'SAME' average pooling without the pad, odd window k, as k*k shifted sums, with the
# gradient of `_mean_taps_bwd`.
mean_taps = _make_mean_taps()


def _bn_train(x, scale, bias, eps: float):
    """BatchNorm on the batch's statistics over every axis but the last (channels):
    `(y, mean, var)`, as flax computes them (`_compute_stats` without the fast variance, then
    `_normalize`)."""
    axes = tuple(range(x.ndim - 1))
    mean = x.mean(axes)
    var = jnp.square(x - mean).mean(axes)
    mul = jax.lax.rsqrt(var + eps)
    if scale is not None:
        mul = mul * scale
    return (x - mean) * mul + bias, mean, var


def _bn_train_fwd(x, scale, bias, eps):
    out = _bn_train(x.value, None if scale is None else scale.value, bias.value, eps)
    mean, var = out[1], out[2]
    return out, (x.value, mean, jax.lax.rsqrt(var + eps), None if scale is None else scale.value)


def _bn_train_bwd(eps, res, cotangents):
    """The gradient of `_bn_train` in two reductions and one elementwise pass. With
    xhat = (x - mean) * r, r = 1 / sqrt(var + eps): dbias = sum dy, dscale = sum dy * xhat,
    dx = scale * r * (dy - dbias / n - xhat * dscale / n); cotangents of the returned mean and
    variance (zero in a train step, where they only feed the moving averages, and then skipped
    symbolically) add dmean / n and dvar * 2 (x - mean) / n
    (`native_batchnorm.add_stats_cotangents`). Autodiff of the two-pass variance ran ~30%
    slower per layer on XLA:CPU (docs/benchmarks.md)."""
    x, mean, r, scale = res
    dy, dmean, dvar = cotangents
    n, axes = x.size // x.shape[-1], tuple(range(x.ndim - 1))
    xc = x - mean
    if isinstance(dy, SymbolicZero):
        dy = jnp.zeros_like(x)
    dbias = dy.sum(axes)
    dscale = (dy * (xc * r)).sum(axes)
    mul = r if scale is None else r * scale
    dx = mul * (dy - dbias / n - (xc * r) * (dscale / n))
    dx = native_batchnorm.add_stats_cotangents(dx, x, mean, dmean, dvar)
    return dx, None if scale is None else dscale, dbias


def _make_bn_train():
    f = jax.custom_vjp(_bn_train, nondiff_argnums=(3,))
    f.defvjp(_bn_train_fwd, _bn_train_bwd, symbolic_zeros=True)
    return f


bn_train = _make_bn_train()
