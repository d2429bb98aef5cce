"""Pure-numpy mapping from another framework's layers to a tljax model's variables.

The readers in `weights_conversion/` (h5py, torch) turn a file into an ordered list of
`SourceLayer`s (a layer name and its named arrays, in the source framework's layout); this
module decides which source layer fills which Flax module, converts layouts, and checks every
shape, so that a wrong file fails with a message naming the layer and both shapes rather than
producing wrong numbers.

Matching (`match`):
- where the family's name function gives the source name of a module (Keras's explicit names
  such as `conv2_block1_1_conv`, or the torch module names), by that name;
- where Keras names layers automatically (InceptionV3's `conv2d_N`/`batch_normalization_N`,
  EfficientNet's `normalization`), by the creation number in the name: the Flax modules are
  created in the order of Keras's source, and Keras numbers auto-named layers in creation
  order (`conv2d`, `conv2d_1`, ... in Keras 3; `conv2d_1`, ... in Keras 2; any offset).
Every module must be filled and every source layer used.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import traverse_util

# Keras layer class (snake case, as in auto names) of each kind of Flax module.
KERAS_CLASS = {
    "conv": "conv2d", "dwconv": "depthwise_conv2d", "dense": "dense",
    "bn": "batch_normalization", "normalization": "normalization",
}


class WeightMismatchError(ValueError):
    """A weight file does not fit the model: the message names the layer and both shapes."""


@dataclasses.dataclass
class SourceLayer:
    """One layer of a weight file: its name and its arrays by weight name, in file order.

    Weight names are Keras's (`kernel`, `bias`, `gamma`, `beta`, `moving_mean`,
    `moving_variance`, `depthwise_kernel`, `mean`, `variance`, `count`) or torch's (`weight`,
    `bias`, `running_mean`, `running_var`); unnamed weights are numbered (`0`, `1`, ...).
    """

    name: str
    weights: dict[str, np.ndarray]
    layout: str = "keras"  # or "torch"


@dataclasses.dataclass(frozen=True)
class TargetLayer:
    """A Flax module that owns variables, in creation order."""

    path: tuple[str, ...]
    kind: str  # conv, dwconv, dense, bn, normalization
    shapes: dict[tuple[str, str], tuple[int, ...]]  # (collection, name) -> shape

    @property
    def path_str(self) -> str:
        return "/".join(self.path)


def target_layers(module: nn.Module, size: int) -> list[TargetLayer]:
    """The modules of `module` that own variables, in the order they are created."""
    from tljax.models.layers import DepthwiseConv

    order: list[tuple[tuple[str, ...], str]] = []

    def record(next_fun, args, kwargs, context):
        mod = context.module
        if context.method_name == "__call__":
            if isinstance(mod, DepthwiseConv):
                kind = "dwconv"
            elif isinstance(mod, nn.Conv):
                kind = "dwconv" if mod.feature_group_count > 1 else "conv"
            elif isinstance(mod, nn.Dense):
                kind = "dense"
            elif isinstance(mod, nn.BatchNorm):
                kind = "bn"
            else:  # another module with variables names the source layer class it reads
                kind = getattr(type(mod), "SOURCE_KIND", None)
            if kind and mod.path not in {p for p, _ in order}:
                order.append((tuple(mod.path), kind))
        return next_fun(*args, **kwargs)

    x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    with nn.intercept_methods(record):
        shapes = jax.eval_shape(module.init, jax.random.key(0), x)
    flat = traverse_util.flatten_dict(
        {c: v for c, v in shapes.items() if c in ("params", "batch_stats")}
    )
    per_module: dict[tuple[str, ...], dict] = {}
    for key, leaf in flat.items():
        collection, *path, name = key
        per_module.setdefault(tuple(path), {})[(collection, name)] = tuple(leaf.shape)
    return [TargetLayer(path, kind, per_module[path]) for path, kind in order]


def _auto_number(name: str, cls: str) -> int | None:
    """`conv2d` -> 0, `conv2d_17` -> 17; None if `name` is not an auto name of `cls`."""
    m = re.fullmatch(rf"{cls}(?:_(\d+))?", name)
    if not m:
        return None
    return int(m.group(1) or 0)


def match(
    targets: Sequence[TargetLayer],
    sources: Sequence[SourceLayer],
    source_name: Callable[[TargetLayer], str | None],
    model: str,
) -> list[tuple[TargetLayer, SourceLayer]]:
    """Pair every target module with its source layer (see the module docstring)."""
    by_name = {s.name: s for s in sources}
    pairs: list[tuple[TargetLayer, SourceLayer | None]] = []
    used: set[str] = set()
    auto: dict[str, list[int]] = {}
    for i, t in enumerate(targets):
        name = source_name(t)
        if name is None:
            auto.setdefault(t.kind, []).append(i)
            pairs.append((t, None))
            continue
        pairs.append((t, by_name.get(name)))
        used.add(name)
    for kind, indices in auto.items():
        cls = KERAS_CLASS[kind]
        candidates = sorted(
            (n, s) for s in sources if s.name not in used
            and (n := _auto_number(s.name, cls)) is not None
        )
        if len(candidates) != len(indices):
            raise WeightMismatchError(
                f"{model}: the model has {len(indices)} automatically named '{cls}' layers, "
                f"the file has {len(candidates)}"
                + _architecture_hint(targets, sources, source_name)
            )
        for i, (_, s) in zip(indices, candidates, strict=True):
            pairs[i] = (pairs[i][0], s)
            used.add(s.name)

    missing = [t for t, s in pairs if s is None]
    if missing:
        names = [source_name(t) for t in missing]
        head_only = all(t.path[0] == "head" for t in missing)
        if head_only:
            raise WeightMismatchError(
                f"{model}: the file has no classifier layer '{names[0]}': it is a notop "
                f"(include_top=False) file; create the model with include_top=False, or convert "
                f"a file with the top"
            )
        shown = ", ".join(
            f"'{n}' ({t.path_str})" for n, t in zip(names[:5], missing[:5], strict=True)
        )
        raise WeightMismatchError(
            f"{model}: {len(missing)} layer(s) of the model are missing from the file: "
            f"{shown}{' ...' if len(missing) > 5 else ''}"
            + _architecture_hint(targets, sources, source_name)
        )
    extra = [s.name for s in sources if s.name not in used]
    if extra:
        if all(_is_head_name(n) for n in extra):
            raise WeightMismatchError(
                f"{model}: the file has a classifier ({', '.join(extra)}) that the model lacks: "
                f"create the model with include_top=True to convert it"
            )
        raise WeightMismatchError(
            f"{model}: the file has {len(extra)} layer(s) the model does not: "
            f"{', '.join(extra[:5])}{' ...' if len(extra) > 5 else ''}"
            + _architecture_hint(targets, sources, source_name)
        )
    return pairs  # type: ignore[return-value]


def _is_head_name(name: str) -> bool:
    return name in ("predictions", "fc1", "fc2", "_fc")


def _architecture_hint(targets, sources, source_name) -> str:
    want = [source_name(t) or KERAS_CLASS[t.kind] + "_N" for t in targets[:3]]
    have = [s.name for s in sources[:3]]
    return (
        f". The model expects {len(targets)} layers ({', '.join(want)}, ...), the file holds "
        f"{len(sources)} ({', '.join(have)}, ...): is it a file of another architecture?"
    )


# Weight names by kind and layout, in the order the frameworks store them. For BatchNorm
# without scale (Keras InceptionV3) the first entry is absent.
_KERAS_ORDER = {
    "conv": ("kernel", "bias"), "dense": ("kernel", "bias"),
    "dwconv": ("depthwise_kernel", "bias"),
    "bn": ("gamma", "beta", "moving_mean", "moving_variance"),
    "normalization": ("mean", "variance", "count"),
}
_TORCH_TO_KERAS = {
    "bn": {"weight": "gamma", "bias": "beta", "running_mean": "moving_mean",
           "running_var": "moving_variance"},
}


def _canonical(t: TargetLayer, s: SourceLayer, model: str) -> dict[str, np.ndarray]:
    """The source layer's arrays under Keras names and in Keras layouts."""
    weights = dict(s.weights)
    if s.layout == "torch":
        weights.pop("num_batches_tracked", None)
        out = {}
        for k, v in weights.items():
            if t.kind == "bn":
                k = _TORCH_TO_KERAS["bn"].get(k, k)
            elif k == "weight":
                if t.kind == "dense":
                    k, v = "kernel", v.T  # (out, in) -> (in, out)
                elif t.kind == "dwconv":
                    k, v = "depthwise_kernel", v.transpose(2, 3, 0, 1)  # (C,1,h,w)->(h,w,C,1)
                else:
                    k, v = "kernel", v.transpose(2, 3, 1, 0)  # (out,in,h,w)->(h,w,in,out)
            out[k] = v
        return out
    if all(k.isdigit() for k in weights):  # unnamed (Keras 3 .weights.h5): by position
        order = list(_KERAS_ORDER[t.kind])
        if t.kind == "bn" and ("params", "scale") not in t.shapes:
            order = order[1:]
        if t.kind in ("conv", "dense", "dwconv") and ("params", "bias") not in t.shapes:
            order = order[:1]
        values = [weights[k] for k in sorted(weights, key=int)]
        if len(values) != len(order):
            raise WeightMismatchError(
                f"{model}: layer '{s.name}' ({t.path_str}) has {len(values)} weights in the "
                f"file, the model expects {len(order)} ({', '.join(order)})"
            )
        return dict(zip(order, values, strict=True))
    if t.kind == "dwconv" and "kernel" in weights:  # Keras 3 names it 'kernel', Keras 2 not
        weights["depthwise_kernel"] = weights.pop("kernel")
    return weights


def assign(
    pairs: Sequence[tuple[TargetLayer, SourceLayer]],
    model: str,
    normalization_fix: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None,
) -> dict:
    """Flax variables (`params`, `batch_stats`) filled from matched source layers.

    `normalization_fix(mean, variance) -> std` computes the EfficientNet input divisor (the
    caller decides about Keras's ImageNet rescaling; see `weights_conversion`).
    """
    flat: dict[tuple[str, ...], np.ndarray] = {}
    for t, s in pairs:
        w = _canonical(t, s, model)
        expected = _KERAS_ORDER[t.kind]
        if t.kind == "bn" and ("params", "scale") not in t.shapes:
            expected = expected[1:]
        if t.kind in ("conv", "dense", "dwconv") and ("params", "bias") not in t.shapes:
            expected = expected[:1]
        present = [k for k in expected if k in w]
        unknown = sorted(set(w) - set(_KERAS_ORDER[t.kind]))
        absent = [k for k in expected if k not in w]
        extra = [k for k in _KERAS_ORDER[t.kind] if k in w and k not in expected]
        if absent or unknown or extra:
            raise WeightMismatchError(
                f"{model}: layer '{s.name}' ({t.path_str}) holds weights "
                f"[{', '.join(w)}] in the file; the model expects [{', '.join(expected)}]"
            )
        if t.kind == "normalization":
            mean, var = w["mean"].reshape(-1), w["variance"].reshape(-1)
            std = normalization_fix(mean, var) if normalization_fix else np.maximum(
                np.sqrt(var), 1e-7)
            values = {("batch_stats", "mean"): mean, ("batch_stats", "std"): std}
        else:
            values = {}
            for k in present:
                v = w[k]
                if k == "depthwise_kernel":
                    v = v.transpose(0, 1, 3, 2)  # Keras (h, w, C, 1) -> Flax (h, w, 1, C)
                key = {
                    "kernel": ("params", "kernel"), "depthwise_kernel": ("params", "kernel"),
                    "bias": ("params", "bias"), "gamma": ("params", "scale"),
                    "beta": ("params", "bias"), "moving_mean": ("batch_stats", "mean"),
                    "moving_variance": ("batch_stats", "var"),
                }[k]
                values[key] = v
        for (collection, name), v in values.items():
            want = t.shapes[(collection, name)]
            if tuple(v.shape) != want:
                shown = {"kernel": "kernel", "scale": "gamma", "mean": "moving_mean",
                         "var": "moving_variance"}.get(name, name)
                raise WeightMismatchError(
                    f"{model}: layer '{s.name}' ({t.path_str}): weight '{shown}' has shape "
                    f"{tuple(v.shape)} in the file, {want} in the model (after layout "
                    f"conversion)"
                )
            flat[(collection, *t.path, name)] = np.asarray(v, np.float32)
    return traverse_util.unflatten_dict(flat)
