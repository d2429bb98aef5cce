"""Linear probing on cached features.

With the whole backbone frozen (`freeze=backbone`) and no augmentation, every epoch would push
the same images through the same frozen network. Instead the pooled features (the input of the
model's `head`) are computed once, with the model in inference mode, and the head trains on them:
after that first pass an epoch costs the head alone. The head keeps the model's own dropout and
the same parameters (`params['head']`), so the result is the checkpoint the full run would write.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from tljax import xla_options
from tljax.models import layers


class Head(nn.Module):
    """The model's top on pooled features: dropout, then the `head` Dense layer."""

    num_classes: int
    dropout_rate: float = 0.0
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, features, train: bool = False):
        x = layers.Dropout(self.dropout_rate)(features, train)
        return nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype,
                        name="head")(x)


def head_of(model: nn.Module) -> Head:
    """The `Head` that matches `model`'s own (classes, dropout, dtypes)."""
    return Head(model.num_classes, getattr(model, "dropout_rate", 0.0), model.dtype,
                model.param_dtype)


def features_fn(model: nn.Module, preprocess: Callable | None = None) -> Callable:
    """`f(variables, images) -> features`: the input of `model`'s head, in inference mode."""

    def capture(next_fun, args, kwargs, context):
        if context.method_name == "__call__" and tuple(context.module.path) == ("head",):
            return args[0]  # the features themselves stand in for the logits
        return next_fun(*args, **kwargs)

    def f(variables, images):
        x = preprocess(images) if preprocess is not None else images
        with nn.intercept_methods(capture):
            return model.apply(variables, x, train=False)

    return f


def compute(fn: Callable, batches: Iterable[dict]) -> tuple[np.ndarray, np.ndarray]:
    """Features and labels of every unmasked example in `batches` (host arrays)."""
    feats, labels = [], []
    for b in batches:
        keep = b["mask"] > 0 if "mask" in b else slice(None)
        feats.append(np.asarray(fn(b["image"]))[keep])
        labels.append(np.asarray(b["label"])[keep])
    return np.concatenate(feats).astype(np.float32), np.concatenate(labels).astype(np.int32)


def train_batches(features: np.ndarray, labels: np.ndarray, local_batch: int, seed: int,
                  start_step: int = 0):
    """Endless batches of cached features, reshuffled every epoch; batch s depends only on
    (seed, s), so a resumed run continues the same sequence."""
    n = len(labels)
    per_epoch = n // local_batch
    if per_epoch == 0:
        raise ValueError(f"{n} cached examples are fewer than the batch of {local_batch}")
    step = start_step
    while True:
        epoch, i = divmod(step, per_epoch)
        order = np.random.default_rng([seed, epoch]).permutation(n)
        idx = order[i * local_batch:(i + 1) * local_batch]
        yield {"features": features[idx], "label": labels[idx]}
        step += 1


def eval_batches(features: np.ndarray, labels: np.ndarray, local_batch: int, count: int):
    """`count` batches of cached features with `mask`, padded like the image pipeline's."""
    from tljax.datasets.pipeline import pad

    for k in range(count):
        part = slice(k * local_batch, (k + 1) * local_batch)
        yield pad({"features": features[part], "label": labels[part]}, local_batch)


def jit_features(model: nn.Module, variables: Any, preprocess: Callable | None = None):
    """A compiled `images -> features` for fixed `variables`."""
    f = xla_options.jit(features_fn(model, preprocess))
    return lambda images: f(variables, images)
