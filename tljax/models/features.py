"""Outputs of layers inside a network: `create(name, include_top=False, features=NAMES)`.

A name is either a Keras Applications layer name that the model marks with a `Tap`
(`block4_conv2`, `conv4_block6_out`, `block6a_expand_activation`, `top_activation`, ...) or
one of tljax's own top-level units (`stage3`, `mixed7`, `block5`, `top`): the output of that
module. `available(module)` lists them in the order the network computes them, which
`tljax.models.info(name)["features"]` shows.

`Features(model, names).apply(variables, images)` returns `{name: NHWC array}`. It shares the
model's scope, so the variables are the model's own (`init` creates all of them; a converted
or pretrained directory fits as it is), and `apply` stops the forward pass once the last
requested output is computed: the layers after it are not run, or traced.

It stops by raising an exception from inside the model, which Flax's own interceptor stack and
module state unwind; an interceptor of yours around `apply` should restore its state in a
`finally`.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn


class Tap(nn.Module):
    """The identity, marking its input as the output of the Keras layer it is named after."""

    @nn.compact
    def __call__(self, x):
        return x


def tap(name: str, x):
    """Mark `x` as the output of Keras layer `name` (call inside a compact method); an empty
    name marks nothing (a block built on its own, outside a network, has no Keras name)."""
    return Tap(name=name)(x) if name else x


def _key(context, depth: int) -> str | None:
    """The feature name of an intercepted call: a `Tap`'s name, or the name of a unit (a
    module `depth + 1` deep: the model's own children)."""
    if context.method_name != "__call__":
        return None
    module = context.module
    if isinstance(module, Tap) or len(module.path) == depth + 1:
        return module.name
    return None


class _Enough(Exception):
    """Raised once every requested output is computed, to skip the rest of the network."""


class Features(nn.Module):
    """`model` (built without its top, `pooling=None`) returning the outputs `names`."""

    model: nn.Module
    names: Sequence[str]

    def setup(self):
        nn.share_scope(self, self.model)

    def __call__(self, x, train=False) -> dict[str, jax.Array]:
        wanted, found = set(self.names), {}
        stop = not self.is_initializing()  # `init` builds every variable of the model

        def grab(next_fun, args, kwargs, context):
            out = next_fun(*args, **kwargs)
            key = _key(context, len(self.path))
            if key in wanted and key not in found:
                found[key] = out
                if stop and len(found) == len(wanted):
                    raise _Enough
            return out

        try:
            with nn.intercept_methods(grab):
                self.model(x, train)
        except _Enough:
            pass
        missing = [n for n in self.names if n not in found]
        if missing:
            raise ValueError(_unknown(missing, available(self.model, x.shape[1])))
        return {n: found[n] for n in self.names}


def _unknown(missing: Sequence[str], names: Sequence[str]) -> str:
    hints = []
    for n in missing:
        close = difflib.get_close_matches(n, names, n=2)
        hints.append(f"{n!r}" + (f" (did you mean {' or '.join(map(repr, close))}?)"
                                 if close else ""))
    return (f"no layer output named {', '.join(hints)}; this model has: {', '.join(names)}")


def available(model: nn.Module, size: int) -> list[str]:
    """The feature names of `model` on `size`x`size` inputs, in the order computed (a trace,
    no arrays)."""
    seen: list[str] = []
    model = model.clone(parent=None) if model.scope is not None else model

    def grab(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        key = _key(context, 0)
        if key is not None and key not in seen:
            seen.append(key)
        return out

    with nn.intercept_methods(grab):
        jax.eval_shape(model.init, jax.random.key(0),
                       jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32))
    return seen
