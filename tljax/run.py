"""What a training run is made of, resolved from its config: the dataset and splits, the
records it writes (config.json, run.json), the model, its optimizer and its initial variables.
`tljax.train` runs it; `tljax.evaluate` rebuilds the same state to restore a checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import sys
import time
from typing import Any

log = logging.getLogger("tljax.run")

# The training stream's definition (`tljax.datasets.pipeline`): recorded in config.json, so
# that resuming a workdir made with another one is named in the warning of changed fields.
INPUT_ORDER = "position-v1"
# Fields that fix the shapes of a run's state: resuming with other values is refused.
SHAPE_FIELDS = ("model", "num_classes", "image_size", "dtype")


class RunError(ValueError):
    """A run that cannot start as configured; the message says what to change."""


@dataclasses.dataclass
class Resolved:
    """What a config resolves to for this run (dataset, sizes, splits)."""

    config: Any
    source: Any
    num_classes: int
    image_size: int
    train_split: str
    eval_split: str
    cached: bool


# --------------------------------------------------------------------------- config


def resolve(config) -> Resolved:
    """Check `config` and fill in what it leaves to the model and the dataset."""
    from tljax import datasets, freeze
    from tljax.models import registry

    spec = registry.spec(config.model)  # an unknown model names the closest ones
    if config.init not in ("imagenet", "scratch") and not os.path.exists(
            os.path.expanduser(config.init)):
        raise RunError(f"config.init={config.init!r}: not 'imagenet', 'scratch' or an "
                       f"existing path")
    if config.dtype not in ("float32", "bfloat16"):
        raise RunError(f"config.dtype={config.dtype!r}: use 'float32' or 'bfloat16'")
    if config.cache_features not in ("auto", "on", "off"):
        raise RunError(f"config.cache_features={config.cache_features!r}: 'auto', 'on' or "
                       f"'off'")
    if config.head_init not in ("random", "zeros"):
        raise RunError(f"config.head_init={config.head_init!r}: 'random' (the model's "
                       "initialiser) or 'zeros'")
    if config.optimizer.name not in ("sgd", "adam", "adamw"):
        raise RunError(f"config.optimizer.name={config.optimizer.name!r}: 'sgd', 'adam' or "
                       f"'adamw'")
    if config.optimizer.schedule not in ("cosine", "constant"):
        raise RunError(f"config.optimizer.schedule={config.optimizer.schedule!r}: 'cosine' or "
                       f"'constant'")
    if isinstance(config.freeze, str):
        # Preset names are checked against the model's parameter tree when it exists; here
        # only the form, so that a typo fails before any data is read.
        if not (config.freeze in ("none", "backbone") or config.freeze.startswith(
                ("up_to:", "top:"))):
            raise freeze.FreezeError(
                f"config.freeze={config.freeze!r}: presets are 'none', 'backbone', "
                f"'up_to:UNIT' and 'top:N', or give a list of (regex, label) rules")
    size = config.image_size or spec.default_size
    if size < spec.min_size:
        raise RunError(f"config.image_size={size}: {config.model} needs at least "
                       f"{spec.min_size}")
    src = _source(config)
    train_split, eval_split = src.default_splits()
    train_split = config.train_split or train_split
    eval_split = config.eval_split or eval_split
    datasets.pipeline.check_split(src, train_split)
    datasets.pipeline.check_split(src, eval_split)
    num_classes = config.num_classes or src.num_classes
    if num_classes < src.num_classes:
        raise RunError(f"config.num_classes={num_classes}, but {src.name} has "
                       f"{src.num_classes} classes")
    no_augment = not tuple(config.augment.crop_area) and not config.augment.flip
    probe = config.freeze == "backbone"
    if config.cache_features == "on" and not (probe and no_augment):
        raise RunError("config.cache_features='on' needs freeze='backbone' and augmentation "
                       "off (config.augment.crop_area=() and config.augment.flip=False)")
    cached = config.cache_features == "on" or (
        config.cache_features == "auto" and probe and no_augment)
    return Resolved(config, src, num_classes, size, train_split, eval_split, cached)


def _source(config):
    """The dataset; with several processes, process 0 prepares it first and the others wait."""
    import jax

    from tljax import datasets

    def get():
        return datasets.source(config.dataset, config.data_dir or None, config.download,
                               config.holdout)

    if jax.process_count() == 1:
        return get()
    from jax.experimental import multihost_utils

    if jax.process_index() == 0:
        get()
    multihost_utils.sync_global_devices("tljax: dataset prepared")
    return get()


def config_record(r: Resolved) -> dict:
    """The resolved config as config.json records it."""
    c = r.config.to_dict()
    c.update(num_classes=r.num_classes, image_size=r.image_size, train_split=r.train_split,
             eval_split=r.eval_split, input_order=INPUT_ORDER)
    return json.loads(json.dumps(c, default=list))


def check_workdir(workdir: str, record: dict) -> None:
    """Refuse to resume a workdir whose run has other shapes (model, classes, size, dtype)."""
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        return
    with open(path) as f:
        old = json.load(f)
    diff = [k for k in SHAPE_FIELDS if old.get(k) != record.get(k)]
    if diff:
        changes = ", ".join(f"{k}: {old.get(k)!r} -> {record.get(k)!r}" for k in diff)
        raise RunError(
            f"{workdir} holds a run with other shapes ({changes}); its checkpoints cannot be "
            f"resumed by this config. Use a new --workdir, or start from its weights with "
            f"config.init={workdir}"
        )
    changed = [k for k in record if k not in ("steps",) and old.get(k) != record.get(k)]
    if changed:
        log.warning("resuming %s with changed config fields: %s", workdir, ", ".join(changed))


def _git_commit() -> str | None:
    try:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        out = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def run_record() -> dict:
    """Versions, git commit, devices and processes, as run.json records them."""
    import importlib.metadata as md

    import jax

    from tljax import host_memory

    versions = {}
    for p in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "tensorflow-cpu",
              "tensorflow", "tensorflow-datasets", "numpy", "tljax"):
        try:
            versions[p] = md.version(p)
        except md.PackageNotFoundError:
            pass
    return {
        "git_commit": _git_commit(),
        "versions": versions,
        "python": sys.version.split()[0],
        "backend": jax.default_backend(),
        "devices": jax.device_count(),
        "local_devices": jax.local_device_count(),
        "processes": jax.process_count(),
        "host_memory": host_memory.state(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "argv": sys.argv,
    }


# --------------------------------------------------------------------------- model and state


def optimizer(config, labels):
    """`(tx, schedule)`: the optimizer of `config` over the parameter `labels` (the freeze
    rules' groups: `frozen` gets no update, `head` its rate multiplier), and its learning-rate
    schedule."""
    import optax

    from tljax import train_step as steps

    o = config.optimizer
    warmup = o.warmup_steps if o.warmup_steps >= 0 else int(0.05 * config.steps)
    warmup = min(warmup, config.steps)
    if o.schedule == "cosine":
        lr = optax.warmup_cosine_decay_schedule(0.0, o.learning_rate, max(warmup, 0),
                                                max(config.steps, warmup + 1))
    else:
        lr = optax.join_schedules(
            [optax.linear_schedule(0.0, o.learning_rate, max(warmup, 1)),
             optax.constant_schedule(o.learning_rate)], [warmup])

    def make(rate):
        if o.name == "sgd":
            tx = optax.sgd(rate, momentum=o.momentum or None)
            if o.weight_decay:
                tx = optax.chain(optax.add_decayed_weights(o.weight_decay), tx)
            return tx
        if o.name == "adam":
            return optax.adam(rate)
        return optax.adamw(rate, weight_decay=o.weight_decay)

    multipliers = {}
    groups = {v for v in _flat_values(labels)}
    if "head" in groups and o.head_multiplier != 1.0:
        multipliers["head"] = o.head_multiplier
    return steps.optimizer(labels, make, lr, multipliers), lr


def _flat_values(tree):
    from flax import traverse_util

    return traverse_util.flatten_dict(tree).values()


def build_model(r: Resolved):
    import jax.numpy as jnp

    from tljax.models import registry

    c = r.config
    options = dict(num_classes=r.num_classes, dtype=jnp.bfloat16 if c.dtype == "bfloat16"
                   else jnp.float32)
    if c.dropout_rate >= 0:
        options["dropout_rate"] = c.dropout_rate
    return registry.create(c.model, **options)


def initial_variables(r: Resolved, model) -> dict:
    """The run's starting variables: random (`scratch`) or pretrained with a new head."""
    from tljax import pretrained

    c = r.config
    if c.init == "scratch":
        log.info("init: random weights (scratch)")
    return pretrained.variables(model, c.model, None if c.init == "scratch" else c.init,
                                r.image_size, c.seed, r.num_classes,
                                zero_head=c.head_init == "zeros")


# --------------------------------------------------------------------------- the run
