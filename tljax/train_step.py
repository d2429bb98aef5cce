"""Pure per-device training and evaluation steps.

`train_step(state, batch, ...)` and `eval_step(state, batch, ...)` see one device's shard of the
global batch and average across the named device axis with `lax.pmean`; `tljax.parallel`
compiles them with `jax.pmap` or `jax.jit(jax.shard_map(...))`. Nothing here knows how many
devices or hosts there are.

Gradients are taken with respect to the trainable parameters only: the frozen ones enter the
loss as constants, so no gradient is computed for them (with the whole backbone frozen, and its
BatchNorm in inference mode, the step costs little more than a forward pass). Frozen
parameters and the statistics of frozen BatchNorm layers are carried over untouched, bit for
bit.

With `StepConfig.ema_decay` set, the state also holds an exponential moving average of the
parameters (`TrainState.ema_params`), updated after each step on the parameters that train or
have trained earlier in the run (`StepConfig.ema_paths`); those that never trained are carried
over, equal to the model's. Evaluating the average uses the run's BatchNorm statistics.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from flax import traverse_util

from tljax import freeze
from tljax.models.layers import TrainMode


@flax.struct.dataclass
class TrainState:
    """Everything a step changes: step counter, parameters, BatchNorm statistics, optimizer,
    and the moving average of the parameters (None when the run keeps none)."""

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    ema_params: Any = None


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """What a step needs besides its arrays (static: part of the compiled function).

    Attributes:
      model: the Flax module.
      tx: the optimizer (`freeze.optimizer` builds one from labels).
      trainable: paths of the parameters that learn (`freeze.trainable(labels)`).
      frozen_bn: BatchNorm module paths kept in inference mode (`freeze.frozen_batchnorm`);
        empty when frozen BatchNorm layers should keep updating their statistics.
      sync_bn: synchronise the batch statistics of training BatchNorm layers across devices.
      axis_name: the device axis to average over.
      preprocess: applied to `batch['image']` on the device before the model (the model's
        `tljax.models.preprocess`), so that the input pipeline can send uint8 images.
      on_features: linear probing on cached features: `model` is the head alone
        (`tljax.feature_cache.Head`), fed `batch['features']`; only `params['head']` is used
        and the BatchNorm statistics are carried over.
      bn_momentum: moving-average momentum of the BatchNorm layers that train (None: the
        model family's own).
      label_smoothing: the training loss's target is `(1 - s) * one_hot + s / classes`
        (evaluation keeps the plain cross-entropy).
      ema_decay: with a value d, `ema_params` becomes `d_t * ema_params + (1 - d_t) * params`
        after each step (`ema_decay_at`); None: `ema_params` is left as it is.
      ema_warmup: `d_t = min(d, (1 + t) / (10 + t))` at step t, so that the average follows
        the early, fast-moving parameters (TensorFlow's `ExponentialMovingAverage` with
        `num_updates`); False: `d_t = d` from the first step.
      ema_paths: the parameters averaged (None: `trainable`); a later phase of a run passes
        every parameter trained so far, so that one it has frozen again keeps averaging
        toward its value rather than stopping where it was.
    """

    model: nn.Module
    tx: optax.GradientTransformation
    trainable: frozenset[str]
    frozen_bn: frozenset[str] = frozenset()
    sync_bn: bool = False
    axis_name: str = "batch"
    preprocess: Any = None
    on_features: bool = False
    bn_momentum: float | None = None
    label_smoothing: float = 0.0
    ema_decay: float | None = None
    ema_warmup: bool = True
    ema_paths: frozenset[str] | None = None

    @property
    def averaged(self) -> frozenset[str]:
        return self.trainable if self.ema_paths is None else self.ema_paths

    def forward(self, params, batch_stats, batch, train, rng=None):
        """`(logits, new batch_stats)` of the model on `batch`."""
        rngs = {"dropout": rng} if rng is not None else {}
        if self.on_features:
            logits = self.model.apply({"params": {"head": params["head"]}}, batch["features"],
                                      train=self.mode if train else False, rngs=rngs)
            return logits, batch_stats
        variables = {"params": params, "batch_stats": batch_stats}
        if not train:
            return self.model.apply(variables, self.inputs(batch), train=False), batch_stats
        logits, updates = self.model.apply(variables, self.inputs(batch), train=self.mode,
                                           mutable=["batch_stats"], rngs=rngs)
        return logits, updates["batch_stats"]

    def inputs(self, batch: Mapping[str, jax.Array]) -> jax.Array:
        """The model's input: `batch['image']`, mirrored where `batch['flip']` is set (the
        input pipeline leaves the flip to the device), then `preprocess`ed."""
        x = batch["image"]
        if "flip" in batch:
            x = jnp.where(batch["flip"][:, None, None, None], x[:, :, ::-1], x)
        return x if self.preprocess is None else self.preprocess(x)

    @property
    def mode(self) -> TrainMode:
        return TrainMode(self.frozen_bn, self.axis_name if self.sync_bn else None,
                         self.bn_momentum, batch_axis=self.axis_name)


def cross_entropy(logits: jax.Array, labels: jax.Array, smoothing: float = 0.0) -> jax.Array:
    """Per-example softmax cross-entropy, computed in float32 whatever the model's dtype;
    with `smoothing` s, against `(1 - s) * one_hot(labels) + s / classes`."""
    logits = logits.astype(jnp.float32)
    if not smoothing:
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), smoothing)
    return optax.softmax_cross_entropy(logits, targets)


def ema_decay_at(step: jax.Array, decay: float, warmup: bool) -> jax.Array:
    """The moving average's decay at the update made by step `step` (counted from 0)."""
    decay = jnp.asarray(decay, jnp.float32)
    if not warmup:
        return decay
    t = step.astype(jnp.float32)
    return jnp.minimum(decay, (1.0 + t) / (10.0 + t))


def _split(tree: Mapping, keep: frozenset[str]) -> tuple[dict, dict]:
    flat = traverse_util.flatten_dict(tree, sep="/")
    return ({k: v for k, v in flat.items() if k in keep},
            {k: v for k, v in flat.items() if k not in keep})


def _join(*parts: dict) -> dict:
    merged = {}
    for p in parts:
        merged.update(p)
    return traverse_util.unflatten_dict(merged, sep="/")


def train_step(state: TrainState, batch: Mapping[str, jax.Array], rng: jax.Array,
               config: StepConfig) -> tuple[TrainState, dict]:
    """One optimizer step on this device's shard of the batch (`image`, `label`)."""
    axis = config.axis_name
    trained, frozen = _split(state.params, config.trainable)
    # The same key on every device: `layers.Dropout` folds in each example's global row.
    rng = jax.random.fold_in(rng, state.step)

    def loss_fn(trained):
        logits, batch_stats = config.forward(_join(trained, frozen), state.batch_stats, batch,
                                             train=True, rng=rng)
        loss = cross_entropy(logits, batch["label"], config.label_smoothing).mean()
        return loss, (logits, batch_stats)

    (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(trained)
    # Each device holds the gradient of its own shard's mean loss: average them.
    grads = jax.lax.pmean(grads, axis)
    full_grads = _join(grads, jax.tree.map(jnp.zeros_like, frozen))
    updates, opt_state = config.tx.update(full_grads, state.opt_state, state.params)
    updates, _ = _split(updates, config.trainable)
    new_trained = optax.apply_updates(trained, updates)
    # Frozen parameters are carried over as they are (not "+ 0", which can flip -0.0).
    params = _join(new_trained, frozen)

    # Statistics of training BatchNorm layers: averaged across devices when not synchronised
    # (synchronised ones are equal already); frozen layers' statistics are left untouched.
    stats_new, _ = _split(batch_stats, _stats_paths(batch_stats, config.frozen_bn, train=True))
    stats_old, _ = _split(state.batch_stats,
                          _stats_paths(state.batch_stats, config.frozen_bn, train=False))
    if not config.sync_bn:
        stats_new = jax.lax.pmean(stats_new, axis)
    metrics = {
        "loss": loss,
        "accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["label"]),
    }
    ema_params = state.ema_params
    if config.ema_decay is not None:
        ema_avg, ema_rest = _split(state.ema_params, config.averaged)
        d = ema_decay_at(state.step, config.ema_decay, config.ema_warmup)
        ema_avg = jax.tree.map(lambda e, p: d * e + (1.0 - d) * p, ema_avg,
                               _split(params, config.averaged)[0])
        ema_params = _join(ema_avg, ema_rest)
    new_state = state.replace(step=state.step + 1, params=params,
                              batch_stats=_join(stats_old, stats_new), opt_state=opt_state,
                              ema_params=ema_params)
    return new_state, jax.lax.pmean(metrics, axis)


@functools.cache
def _stats_paths_cached(keys: tuple[str, ...], frozen_bn: frozenset[str], train: bool):
    def module(k: str) -> str:
        return k.rsplit("/", 1)[0]

    frozen = {k for k in keys if module(k) in frozen_bn}
    return frozenset(k for k in keys if (k not in frozen) == train)


def _stats_paths(batch_stats, frozen_bn, train: bool) -> frozenset[str]:
    keys = tuple(sorted(traverse_util.flatten_dict(batch_stats, sep="/")))
    return _stats_paths_cached(keys, frozen_bn, train)


def carried_paths(state: TrainState, config: StepConfig) -> frozenset[str]:
    """The state's leaves that `train_step` returns as it was given them, as paths
    ('params/...', 'batch_stats/...', 'ema_params/...'): the frozen parameters, the moving
    averages not updated (`StepConfig.ema_paths`), the statistics of frozen BatchNorm layers.
    `tljax.parallel` passes these into the compiled step without returning them (and checks,
    when it traces the step, that each one comes back untouched)."""
    params = traverse_util.flatten_dict(state.params, sep="/")
    stats = _stats_paths(state.batch_stats, config.frozen_bn, train=False)
    frozen = [k for k in params if k not in config.trainable]
    if config.ema_decay is not None and state.ema_params is None:
        raise ValueError("StepConfig.ema_decay is set but the state has no ema_params: build "
                         "it with create_state(..., ema=True)")
    ema = [f"ema_params/{k}" for k in traverse_util.flatten_dict(state.ema_params or {}, sep="/")
           if config.ema_decay is None or k not in config.averaged]
    return frozenset([f"params/{k}" for k in frozen] + [f"batch_stats/{k}" for k in stats]
                     + ema)


def eval_step(state: TrainState, batch: Mapping[str, jax.Array], config: StepConfig) -> dict:
    """Summed loss, top-1 and top-5 hits and example count over all devices' shards."""
    logits, _ = config.forward(state.params, state.batch_stats, batch, train=False)
    labels = batch["label"]
    mask = batch.get("mask", jnp.ones(labels.shape, jnp.float32))
    top5 = jnp.any(jax.lax.top_k(logits, min(5, logits.shape[-1]))[1] == labels[:, None], -1)
    sums = {
        "loss": jnp.sum(cross_entropy(logits, labels) * mask),
        "top1": jnp.sum((jnp.argmax(logits, -1) == labels) * mask),
        "top5": jnp.sum(top5 * mask),
        "count": jnp.sum(mask),
    }
    return jax.lax.psum(sums, config.axis_name)


def eval_steps(states: Sequence[TrainState], batch: Mapping[str, jax.Array],
               config: StepConfig) -> list[dict]:
    """`eval_step` of each of `states` (parameters of one model: the run's and their moving
    average, or several checkpoints) on the same batch, as one program: one launch per batch,
    since XLA's CPU collectives can deadlock with launches of several programs in flight."""
    return [eval_step(s, batch, config) for s in states]


def create_state(variables: Mapping, tx: optax.GradientTransformation,
                 ema: bool = False) -> TrainState:
    """A fresh training state (step 0, new optimizer state) from model variables; with `ema`,
    its moving average of the parameters starts as a copy of them."""
    params = variables["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      batch_stats=variables.get("batch_stats", {}),
                      opt_state=tx.init(params),
                      # Copies: the compiled step donates both trees' buffers.
                      ema_params=jax.tree.map(np.array, params) if ema else None)


def optimizer(labels: Mapping, make: Any, learning_rate: Any,
              multipliers: Mapping[str, float] | None = None) -> optax.GradientTransformation:
    """`optax.multi_transform` over freeze labels: `frozen` gets `optax.set_to_zero()` (no
    state); each trained group gets `make(learning_rate * multiplier)`, where `learning_rate`
    is a float or an optax schedule and `make` e.g. `lambda lr: optax.sgd(lr, momentum=0.9)`.
    """
    multipliers = dict(multipliers or {})
    groups = {v for v in traverse_util.flatten_dict(labels).values()}
    unknown = set(multipliers) - groups
    if unknown:
        raise freeze.FreezeError(
            f"learning-rate multipliers for groups {sorted(unknown)} that the freeze "
            f"specification does not define; its groups are {sorted(groups)}"
        )
    txs = {}
    for g in groups:
        if g == freeze.FROZEN:
            txs[g] = optax.set_to_zero()
            continue
        m = multipliers.get(g, 1.0)
        lr = (lambda step, m=m: m * learning_rate(step)) if callable(learning_rate) \
            else learning_rate * m
        txs[g] = make(lr)
    return optax.multi_transform(txs, labels)
