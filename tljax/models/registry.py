"""The model registry: every architecture by name, with what users need to know about it.

`create(name, **options)` builds a `flax.linen.Module`; `info(name)` describes it;
`spec(name)` gives the registry entry that the conversion and fetching code use.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from tljax.models import efficientnet, inception, layers, resnet, vgg
from tljax.models.family import Family
from tljax.models.features import Features, available


@dataclasses.dataclass(frozen=True)
class WeightFile:
    """An official Keras Applications weight file: path under the base URL, and its MD5."""

    path: str
    md5: str

    @property
    def filename(self) -> str:
        return self.path.rsplit("/", 1)[-1]


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A registered architecture.

    Attributes:
      name: registry name (`resnet50`).
      family: the family's contract (`tljax.models.family.Family`): its units and blocks for
        the freezing presets, its constant statistics; `family.name` is `vgg`, `resnet`, ...
      build: `build(**options) -> nn.Module`.
      default_size: the input size the weights were trained at.
      min_size: the smallest input accepted.
      numerics: epsilon, momentum, padding and preprocessing of the weights' origin.
      keras_name: the `keras.applications` constructor (`ResNet50`), None when Keras has none.
      keras_layer_name: maps a Flax module path to the Keras layer name (None: auto-named).
      weights: official Keras files, `{'top': WeightFile, 'notop': WeightFile}`.
      torch_layer_name: for models with a torch port, Flax module path to torch module name.
    """

    name: str
    family: Family
    build: Callable[..., nn.Module]
    default_size: int
    min_size: int
    numerics: layers.Numerics
    keras_name: str | None
    keras_layer_name: Callable[[tuple[str, ...]], str | None] | None
    weights: dict[str, WeightFile]
    torch_layer_name: Callable[..., str] | None = None


def _keras_files(stem: str, top_md5: str, notop_md5: str) -> dict[str, WeightFile]:
    return {
        "top": WeightFile(f"{stem}_weights_tf_dim_ordering_tf_kernels.h5", top_md5),
        "notop": WeightFile(f"{stem}_weights_tf_dim_ordering_tf_kernels_notop.h5", notop_md5),
    }


_KA = "tensorflow/keras-applications"
_RESNET_MD5 = {  # keras/src/applications/resnet.py WEIGHTS_HASHES
    "resnet50": ("2cb95161c43110f7111970584f804107", "4d473c1dd8becc155b73f8504c6f6626"),
    "resnet101": ("f1aeb4b969a6efcfb50fad2f0c20cfc5", "88cf7a10940856eca736dc7b7e228a21"),
    "resnet152": ("100835be76be38e30d865e96f2aaae62", "ee4c566cf9a93f14d82f913c2dc6dd0c"),
    "resnet50v2": ("3ef43a0b657b3be2300d5770ece849e0", "fac2f116257151a9d068a22e544a4917"),
    "resnet101v2": ("6343647c601c52e1368623803854d971", "c0ed64b8031c3730f411d2eb4eea35b5"),
    "resnet152v2": ("a49b44d1979771252814e80f8ec446f9", "ed17cf2e0169df9d443503ef94b23b33"),
}
_EFFICIENTNET_MD5 = {  # keras/src/applications/efficientnet.py WEIGHTS_HASHES
    "b0": ("902e53a9f72be733fc0bcb005b3ebbac", "50bc09e76180e00e4465e1a485ddc09d"),
    "b1": ("1d254153d4ab51201f1646940f018540", "74c4e6b3e1f6a1eea24c589628592432"),
    "b2": ("b15cce36ff4dcbd00b6dd88e7857a6ad", "111f8e2ac8aa800a7a99e3239f7bfb39"),
    "b3": ("ffd1fdc53d0ce67064dc6a9c7960ede0", "af6d107764bb5b1abb91932881670226"),
    "b4": ("18c95ad55216b8f92d7e70b3a046e2fc", "ebc24e6d6c33eaebbd558eafbeedf1ba"),
    "b5": ("ace28f2a6363774853a83a0b21b9421a", "38879255a25d3c92d5e44e04ae6cec6f"),
    "b6": ("165f6e37dce68623721b423839de8be5", "9ecce42647a20130c1f39a5d4cb75743"),
    "b7": ("8c03f828fec3ef71311cd463b6759d99", "cbcfe4450ddf6f3ad90b1b398090fe4a"),
}


def _registry() -> dict[str, ModelSpec]:
    specs = [
        ModelSpec("vgg16", vgg.FAMILY, vgg.VGG16, 224, vgg.MIN_SIZE, vgg.NUMERICS, "VGG16",
                  vgg.keras_name, _keras_files(f"{_KA}/vgg16/vgg16",
                  "64373286793e3c8b2b4e3219cbf3544b", "6d6bbae143d832006294945121d1f1fc")),
        ModelSpec("vgg19", vgg.FAMILY, vgg.VGG19, 224, vgg.MIN_SIZE, vgg.NUMERICS, "VGG19",
                  vgg.keras_name, _keras_files(f"{_KA}/vgg19/vgg19",
                  "cbe5617147190e668d6c5d5026f83318", "253f8cb515780f3b799900260a226db6")),
        ModelSpec("inception_v3", inception.FAMILY, inception.InceptionV3, 299, inception.MIN_SIZE,
                  inception.NUMERICS, "InceptionV3", inception.keras_name,
                  _keras_files(f"{_KA}/inception_v3/inception_v3",
                               "9a0d58056eeedaa3f26cb7ebd46da564",
                               "bcbd6486424b2319ff4ef7d526e38f63")),
    ]
    for depth, v1, v2 in [(50, resnet.ResNet50, resnet.ResNet50V2),
                          (101, resnet.ResNet101, resnet.ResNet101V2),
                          (152, resnet.ResNet152, resnet.ResNet152V2)]:
        for suffix, build, numerics, keras in [("", v1, resnet.NUMERICS_V1, f"ResNet{depth}"),
                                              ("v2", v2, resnet.NUMERICS_V2, f"ResNet{depth}V2")]:
            stem = f"resnet{depth}{suffix}"
            name = f"resnet{depth}" + ("_v2" if suffix else "")
            specs.append(ModelSpec(
                name, resnet.FAMILY, build, 224, resnet.MIN_SIZE, numerics, keras,
                resnet.keras_name, _keras_files(f"{_KA}/resnet/{stem}", *_RESNET_MD5[stem]),
            ))
    specs.append(ModelSpec("test_resnet", resnet.FAMILY, resnet.TestResNet, 224, resnet.MIN_SIZE,
                           resnet.NUMERICS_V1, None, None, {}))
    specs.append(ModelSpec("test_efficientnet", efficientnet.FAMILY, efficientnet.TestEfficientNet,
                           224, efficientnet.MIN_SIZE, efficientnet.NUMERICS, None, None, {}))
    for name, variant in efficientnet.VARIANTS.items():
        lite = "lite" in name
        b = name.rsplit("_", 1)[-1]
        weights = {} if lite else {
            "top": WeightFile(f"keras-applications/efficientnet{b}.h5", _EFFICIENTNET_MD5[b][0]),
            "notop": WeightFile(
                f"keras-applications/efficientnet{b}_notop.h5", _EFFICIENTNET_MD5[b][1]
            ),
        }
        specs.append(ModelSpec(
            name, efficientnet.FAMILY, functools.partial(efficientnet.build, name),
            variant.resolution, efficientnet.MIN_SIZE,
            efficientnet.NUMERICS_LITE if lite else efficientnet.NUMERICS,
            None if lite else f"EfficientNet{b.upper()}",
            None if lite else efficientnet.keras_name, weights,
            torch_layer_name=efficientnet.torch_name if lite else None,
        ))
    return {s.name: s for s in specs}


REGISTRY: dict[str, ModelSpec] = _registry()


def register(spec: ModelSpec) -> None:
    """Add an architecture to the registry (a new family's file calls it for each model; see
    docs/adding_a_model.md). A name already taken is refused."""
    if spec.name in REGISTRY:
        raise ValueError(f"a model named {spec.name!r} is registered already")
    REGISTRY[spec.name] = spec


def family(name: str) -> Family:
    """The family contract of model `name` (`spec(name).family`)."""
    return spec(name).family


def names() -> list[str]:
    """All registered model names."""
    return sorted(REGISTRY)


def spec(name: str) -> ModelSpec:
    """The registry entry for `name`; an unknown name suggests the closest registered ones."""
    try:
        return REGISTRY[name]
    except KeyError:
        normal = name.lower().replace("-", "_")
        if normal in REGISTRY:
            hint = f"did you mean '{normal}'?"
        else:
            close = difflib.get_close_matches(normal, REGISTRY, n=3, cutoff=0.5)
            hint = (f"did you mean {' or '.join(repr(c) for c in close)}? " if close else "")
            hint += f"Registered models: {', '.join(names())}"
        raise ValueError(f"unknown model {name!r}; {hint}") from None


_OPTIONS = ("num_classes", "include_top", "pooling", "dropout_rate", "drop_connect_rate",
            "dtype", "param_dtype", "features")


def create(name: str, **options: Any) -> nn.Module:
    """Build the Flax module registered as `name`.

    Options are those of Keras Applications: `num_classes` (Keras's `classes`), `include_top`,
    `pooling` (None, 'avg', 'max'), `dropout_rate`, `drop_connect_rate` (EfficientNet only),
    `dtype` (computation) and `param_dtype` (storage). Any input size down to the family's
    minimum works: the size is that of the images given to `init` and `apply`.

    `module.apply(variables, images, train=False)` returns logits (no softmax) with a top, else
    pooled features, or the last feature map when `pooling=None`.

    `features=NAMES` (with `include_top=False`): `apply` returns `{name: NHWC output}` for
    Keras layer names (`conv4_block6_out`, `block6a_expand_activation`, ...) or tljax's units
    (`stage3`, `mixed7`), and computes nothing after the last of them (`info(name)["features"]`
    lists the names; `tljax.models.features`). The variables are the model's own.
    """
    s = spec(name)
    allowed = set(_OPTIONS) - ({"drop_connect_rate"} if s.family.name != "efficientnet"
                               else set())
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise TypeError(
            f"{name}: unknown option(s) {', '.join(unknown)}; valid: {', '.join(sorted(allowed))}"
        )
    names = options.pop("features", None)
    if names is None:
        return s.build(**options)
    if isinstance(names, str):
        names = (names,)
    if options.get("include_top", True) or options.get("pooling") is not None:
        raise ValueError(f"{name}: features= returns feature maps; pass include_top=False "
                         "(and no pooling)")
    if not names:
        raise ValueError(f"{name}: features= names no layer; see "
                         f"tljax.models.info({name!r})['features']")
    return Features(s.build(**options), tuple(names))


def random_variables(module, size: int, seed: int = 0):
    """Variables of `module` for `size`x`size` inputs, filled on the host: He-normal kernels,
    zero biases and means, unit scales and variances. For benchmarks and tests, where
    compiling `module.init` (tens of seconds on CPU) would cost more than the work itself."""
    import numpy as np

    shapes = jax.eval_shape(module.init, jax.random.key(0),
                            jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32))
    rng = np.random.default_rng(seed)

    def fill(path, s):
        name = path[-1].key
        if name == "var" or name == "std" or name == "scale":
            return np.ones(s.shape, np.float32)
        if name in ("mean", "bias"):
            return np.zeros(s.shape, np.float32)
        fan_in = int(np.prod(s.shape[:-1])) or 1
        return (rng.standard_normal(s.shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(fill, shapes)


@functools.cache
def _param_count(name: str, include_top: bool) -> int:
    s = spec(name)
    module = create(name, include_top=include_top)
    x = jax.ShapeDtypeStruct((1, s.default_size, s.default_size, 3), jnp.float32)
    shapes = jax.eval_shape(module.init, jax.random.key(0), x)
    return sum(_numel(p.shape) for p in jax.tree_util.tree_leaves(shapes["params"]))


@functools.cache
def _features(name: str) -> tuple[str, ...]:
    s = spec(name)
    return tuple(available(create(name, include_top=False), s.default_size))


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def info(name: str) -> dict[str, Any]:
    """What a researcher needs to know about `name`: sizes, preprocessing, parameter count
    (with the 1000-class ImageNet top and without), and the official Keras weight files."""
    s = spec(name)
    return {
        "name": s.name,
        "family": s.family.name,
        "default_size": s.default_size,
        "min_size": s.min_size,
        "preprocessing": s.numerics.preprocessing,
        "bn_epsilon": s.numerics.bn_epsilon,
        "bn_momentum": s.numerics.bn_momentum,
        "padding": s.numerics.padding,
        "params": _param_count(name, True),
        "params_notop": _param_count(name, False),
        "features": list(_features(name)),
        "keras_application": s.keras_name,
        "keras_weights": {k: {"file": w.filename, "path": w.path, "md5": w.md5}
                          for k, w in s.weights.items()},
    }
