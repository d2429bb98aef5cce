"""What a training run is made of, resolved from its config: the dataset and splits, the
records it writes (config.json, run.json), the model, its optimizer and its initial variables.
`tljax.train` runs it; `tljax.evaluate` rebuilds the same state to restore a checkpoint.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import re
import subprocess
import sys
import time
from typing import Any

from tljax import storage

log = logging.getLogger("tljax.run")

# The training stream's definition (`tljax.datasets.pipeline`): recorded in config.json, so
# that resuming a workdir made with another one is named in the warning of changed fields.
INPUT_ORDER = "position-v1"
# Fields that fix the shapes of a run's state: resuming with other values is refused.
SHAPE_FIELDS = ("model", "num_classes", "image_size", "dtype")
# What a resumed run may change: how often it logs, evaluates and checkpoints, its caches and
# where its data lies. Anything else would make its numbers those of another run.
RESUMABLE = ("log_every", "eval_every", "checkpoint_every", "keep_checkpoints",
             "data_cache_gb", "compilation_cache", "eval_batch_size", "data_dir", "download")
# Fields added since workdirs were first written, and the value that an older workdir, which
# does not record them, ran with.
IMPLIED = {"ema_decay": None, "ema_warmup": True, "select_on": "raw"}


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
    validation_split: str  # model selection: evaluations during the run, the best checkpoint
    test_split: str | None  # evaluated once, at the end (None: the dataset has none)
    select: str = "raw"  # the parameters selected and reported: 'raw' or 'ema' (their average)


# --------------------------------------------------------------------------- config


def resolve(config) -> Resolved:
    """Check `config` and fill in what it leaves to the model and the dataset."""
    from tljax import datasets
    from tljax.models import registry

    spec = registry.spec(config.model)  # an unknown model names the closest ones
    if config.init not in ("imagenet", "scratch") and not storage.exists(config.init):
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
    for phase in phases(config):
        o, where = phase.optimizer, f" (phase {phase.name!r})" if phase.name else ""
        if o.weight_decay and o.name == "adam":
            raise RunError(
                f"config.optimizer.weight_decay={o.weight_decay} with adam{where}, which has "
                f"no weight decay: use 'adamw' (decoupled decay), or set weight_decay=0")
        if o.nesterov and not (o.name == "sgd" and o.momentum):
            raise RunError(f"config.optimizer.nesterov=True{where} needs sgd with momentum > 0")
        if o.warmup_steps is not None and o.warmup_steps < 0:
            raise RunError(f"warmup_steps={o.warmup_steps}{where}: 0 or more (None: 5% of the "
                           f"phase's steps)")
    if config.dropout_rate is not None and not 0.0 <= config.dropout_rate < 1.0:
        raise RunError(f"config.dropout_rate={config.dropout_rate}: in [0, 1), or None for the "
                       f"model's own")
    if config.bn_momentum is not None and not 0.0 <= config.bn_momentum < 1.0:
        raise RunError(f"config.bn_momentum={config.bn_momentum}: in [0, 1), or None for the "
                       f"model's own")
    if config.optimizer.clip_norm is not None and not config.optimizer.clip_norm > 0:
        raise RunError(f"config.optimizer.clip_norm={config.optimizer.clip_norm}: a positive "
                       f"global norm, or None for no clipping")
    if not 0.0 <= config.label_smoothing < 1.0:
        raise RunError(f"config.label_smoothing={config.label_smoothing}: in [0, 1)")
    ema = config.get("ema_decay")
    if ema is not None and not 0.0 <= ema < 1.0:
        raise RunError(f"config.ema_decay={ema}: in [0, 1) (e.g. 0.999), or None for no moving "
                       f"average")
    select = config.get("select_on", "") or ("ema" if ema is not None else "raw")
    if select not in ("raw", "ema"):
        raise RunError(f"config.select_on={select!r}: 'raw' (the parameters) or 'ema' (their "
                       f"moving average); '' chooses 'ema' when config.ema_decay is set")
    if select == "ema" and ema is None:
        raise RunError("config.select_on='ema' needs a moving average: set config.ema_decay "
                       "(e.g. 0.999)")
    try:
        re.compile(config.optimizer.weight_decay_on)
    except re.error as e:
        raise RunError(f"config.optimizer.weight_decay_on={config.optimizer.weight_decay_on!r}"
                       f": not a regular expression ({e})") from None
    if config.optimizer.schedule not in ("cosine", "constant"):
        raise RunError(f"config.optimizer.schedule={config.optimizer.schedule!r}: 'cosine' or "
                       f"'constant'")
    _check_freeze_form("config.freeze", config.freeze)
    size = config.image_size or spec.default_size
    if size < spec.min_size:
        raise RunError(f"config.image_size={size}: {config.model} needs at least "
                       f"{spec.min_size}")
    ft = config.get("finetune")  # configs written before the two-phase recipe lack it
    if ft is not None:
        if ft.steps < 0:
            raise RunError(f"config.finetune.steps={ft.steps}: 0 (one phase) or the steps of a "
                           f"second phase")
        if ft.optimizer_state not in ("reset", "carry"):
            raise RunError(f"config.finetune.optimizer_state={ft.optimizer_state!r}: 'reset' "
                           "(a fresh state for the second phase) or 'carry'")
        if ft.batchnorm not in ("inference", "train"):
            raise RunError(f"config.finetune.batchnorm={ft.batchnorm!r}: 'inference' (moving "
                           "statistics throughout) or 'train' (batch statistics in the layers "
                           "that train)")
        if ft.optimizer not in ("", "sgd", "adam", "adamw"):
            raise RunError(f"config.finetune.optimizer={ft.optimizer!r}: '' (the first "
                           f"phase's), 'sgd', 'adam' or 'adamw'")
        if ft.steps:
            _check_freeze_form("config.finetune.freeze", ft.freeze)
    two_phase = bool(ft and ft.steps)
    head_only = config.freeze == "backbone"
    no_augment = not tuple(config.augment.crop_area) and not config.augment.flip
    if config.cache_features == "on" and not (head_only and (no_augment or two_phase)):
        raise RunError("config.cache_features='on' needs freeze='backbone' and, in a single "
                       "phase, augmentation off (config.augment.crop_area=() and "
                       "config.augment.flip=False)")
    src = _source(config)
    train, validation, test = src.default_splits()
    train = config.train_split or train
    validation = config.validation_split or validation
    test = None if config.test_split == "none" else (config.test_split or test)
    roles = {"train_split": train, "validation_split": validation}
    if test:
        roles["test_split"] = test
    for split in roles.values():
        datasets.pipeline.check_split(src, split)
    names = list(roles)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            if _overlap(src, roles[a], roles[b]):
                raise RunError(
                    f"config.{a}={roles[a]!r} and config.{b}={roles[b]!r} share examples (the "
                    f"default validation split is held out of train: name both, e.g. "
                    f"'train[:90%]' and 'train[90%:]'); each role needs its own examples")
    num_classes = config.num_classes or src.num_classes
    if num_classes < src.num_classes:
        raise RunError(f"config.num_classes={num_classes}, but {src.name} has "
                       f"{src.num_classes} classes")
    return Resolved(config, src, num_classes, size, train, validation, test, select)


def _overlap(src, a: str, b: str) -> bool:
    """Whether splits `a` and `b` (TFDS split specs, slices included) share an example."""
    ranges = [[(name, start or 0, n if to is None else to)
               for name, start, to, n in src._instructions(s)] for s in (a, b)]  # noqa: SLF001
    return any(x == y and max(s1, s2) < min(e1, e2)
               for x, s1, e1 in ranges[0] for y, s2, e2 in ranges[1])


@dataclasses.dataclass(frozen=True)
class Phase:
    """Steps `start + 1 .. end` of a run: what trains (`freeze`), with which optimizer
    settings (a `config.optimizer`-like dict), and whether on cached features."""

    name: str
    start: int
    end: int
    freeze: Any
    optimizer: Any
    optimizer_state: str  # 'reset': a fresh optimizer state; 'carry': the previous phase's
    cached: bool
    bn_inference: bool = False  # every BatchNorm layer on its moving statistics

    @property
    def steps(self) -> int:
        return self.end - self.start


def phases(config) -> list[Phase]:
    """The run's phases: one, or with `config.finetune.steps` two: `config.freeze` for
    `config.steps` (named 'head' when that is the backbone frozen, else 'first'), then
    `config.finetune.freeze` for `config.finetune.steps` ('finetune') with its own optimizer,
    rate and BatchNorm mode.

    A phase trains on cached features (`tljax.feature_cache`) when its backbone is frozen and
    its images are not augmented: a single-phase probe with augmentation off, or the first
    phase of two, which sees the evaluation crop while `config.augment` applies to the second
    (`cache_features='off'` makes it stream augmented images instead)."""
    import ml_collections

    spec = config.freeze if isinstance(config.freeze, str) else [tuple(x) for x in config.freeze]
    no_augment = not tuple(config.augment.crop_area) and not config.augment.flip
    ft = config.get("finetune")
    two_phase = bool(ft and ft.steps)
    cached = config.cache_features == "on" or (
        config.cache_features == "auto" and spec == "backbone" and (no_augment or two_phase))
    if not two_phase:
        return [Phase("", 0, config.steps, spec, config.optimizer, "reset", cached)]
    first = "head" if spec == "backbone" else "first"
    second = ml_collections.ConfigDict(config.optimizer.to_dict())
    second.name = ft.optimizer or config.optimizer.name
    second.learning_rate = ft.learning_rate
    second.warmup_steps = ft.warmup_steps
    ft_spec = ft.freeze if isinstance(ft.freeze, str) else [tuple(x) for x in ft.freeze]
    return [Phase(first, 0, config.steps, spec, config.optimizer, "reset", cached),
            Phase("finetune", config.steps, config.steps + ft.steps, ft_spec, second,
                  ft.optimizer_state, False, ft.batchnorm == "inference")]


def phase_of(plan: list[Phase], step: int) -> int:
    """The index of the phase a checkpoint at `step` was written in (its state's layout)."""
    for i, phase in enumerate(plan):
        if step <= phase.end:
            return i
    raise RunError(f"step {step} is past the run's {plan[-1].end} steps")


def _check_freeze_form(field: str, spec) -> None:
    """Preset names are checked against the model's parameter tree when it exists; here only
    the form, so that a typo fails before any data is read."""
    from tljax import freeze

    if isinstance(spec, str) and not (spec in ("none", "backbone")
                                      or spec.startswith(("up_to:", "top:"))):
        raise freeze.FreezeError(
            f"{field}={spec!r}: presets are 'none', 'backbone', 'up_to:UNIT' and 'top:N', or "
            f"give a list of (regex, label) rules")


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
             validation_split=r.validation_split, test_split=r.test_split or "none",
             select_on=r.select, input_order=INPUT_ORDER)
    return json.loads(json.dumps(c, default=list))


def check_workdir(workdir: str, record: dict) -> dict:
    """Refuse to resume a workdir whose run this config would change; return the changes it
    allows (`{field: [old, new]}`: logging, evaluation and checkpoint frequency, caches, the
    data's location), which do not alter what the run computes. Called before anything is
    written, so that a refused config leaves the workdir as it was."""
    path = storage.join(workdir, "config.json")
    if not storage.exists(path):
        return {}
    old, new = _flat(json.loads(storage.read_text(path))), _flat(record)
    old, new = {**IMPLIED, **old}, {**IMPLIED, **new}
    if "eval_split" in old:
        raise RunError(
            f"{workdir} was written by an earlier tljax, which selected checkpoints on its "
            f"eval split; this one selects on a validation split and tests at the end. Use a "
            f"new --workdir (start from its weights with config.init={workdir}), or evaluate "
            f"it with `python -m tljax.evaluate --workdir {workdir}`")
    if old.get("ema_decay") is None and new.get("ema_decay") is None:  # no moving average
        old.pop("ema_warmup", None)
        new.pop("ema_warmup", None)
    if not old.get("finetune.steps") and not new.get("finetune.steps"):
        old = {k: v for k, v in old.items() if not k.startswith("finetune.")}  # no 2nd phase
        new = {k: v for k, v in new.items() if not k.startswith("finetune.")}
    changed = {k: [old.get(k), new.get(k)] for k in sorted(set(old) | set(new))
               if old.get(k) != new.get(k)}  # a field one side lacks counts as changed
    refused = {k: v for k, v in changed.items() if k not in RESUMABLE}
    if refused:
        shape = [k for k in refused if k in SHAPE_FIELDS]
        changes = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in refused.items())
        raise RunError(
            f"{workdir} holds a run that this config would change ({changes})"
            + (": its checkpoints do not fit" if shape else "") + ". Resume with the config "
            f"it records (WORKDIR/config.json), use a new --workdir, or start a new run from "
            f"its weights with config.init={workdir}. Only {', '.join(RESUMABLE)} may change "
            f"on a resume")
    if changed:
        log.info("resuming %s with changed %s", workdir,
                 ", ".join(f"{k} ({a!r} -> {b!r})" for k, (a, b) in changed.items()))
    return changed


def _flat(record: dict, prefix: str = "") -> dict:
    """A config record with nested fields as dotted keys (`optimizer.learning_rate`)."""
    out = {}
    for k, v in record.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _git_commit() -> str | None:
    try:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        out = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def quiet_libraries() -> None:
    """The command lines' log levels for other libraries: their warnings are not ours (absl,
    Orbax, TensorFlow), and object-storage clients log progress at INFO."""
    for noisy in ("absl", "orbax", "tensorflow"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    for chatty in ("fsspec", "gcsfs", "google"):
        logging.getLogger(chatty).setLevel(logging.WARNING)


def run_history(workdir: str, changed: dict) -> dict:
    """run.json of this start: `run_record()`, the config fields changed since the start
    before (`changed`), and the earlier starts of the run (`history`, oldest first)."""
    path = storage.join(workdir, "run.json")
    history = []
    if storage.exists(path):
        before = json.loads(storage.read_text(path))
        history = before.pop("history", []) + [before]
    return {**run_record(), "changed": changed, "history": history}


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


def optimizer(phase: Phase, labels):
    """`(tx, schedule)`: the optimizer of `phase` over the parameter `labels` (the freeze
    rules' groups: `frozen` gets no update, `head` its rate multiplier), and its learning-rate
    schedule, which counts the phase's own steps (from 0 at `phase.start`)."""
    import optax

    from tljax import train_step as steps

    o, n = phase.optimizer, phase.steps
    warmup = o.warmup_steps if o.warmup_steps is not None else int(0.05 * n)
    warmup = min(warmup, n)
    if o.schedule == "cosine":
        lr = optax.warmup_cosine_decay_schedule(0.0, o.learning_rate, max(warmup, 0),
                                                max(n, warmup + 1))
    else:
        lr = optax.join_schedules(
            [optax.linear_schedule(0.0, o.learning_rate, max(warmup, 1)),
             optax.constant_schedule(o.learning_rate)], [warmup])
    rate = lr
    if phase.optimizer_state == "carry":  # the carried count goes on from the phase before
        rate = functools.partial(lambda base, start, count: base(count - start), lr,
                                 phase.start)

    decays = decay_mask(o.weight_decay_on)

    def make(rate):
        if o.name == "sgd":
            tx = optax.sgd(rate, momentum=o.momentum or None, nesterov=o.nesterov)
            if o.weight_decay:  # L2 through the update (the gradient), as torch's SGD
                tx = optax.chain(optax.add_decayed_weights(o.weight_decay, decays), tx)
            return tx
        if o.name == "adam":  # resolve() refuses weight decay with adam
            return optax.adam(rate)
        return optax.adamw(rate, weight_decay=o.weight_decay, mask=decays)

    multipliers = {}
    groups = {v for v in _flat_values(labels)}
    if "head" in groups and o.head_multiplier != 1.0:
        multipliers["head"] = o.head_multiplier
    tx = steps.optimizer(labels, make, rate, multipliers)
    if o.clip_norm is not None:  # over every trained parameter (frozen ones have no gradient)
        tx = optax.chain(optax.clip_by_global_norm(o.clip_norm), tx)
    return tx, lr


def decay_mask(pattern: str):
    """`params -> tree of bools`: which parameters weight decay applies to, those whose path
    (`stage4/block1/conv1/kernel`) matches `pattern` in full."""
    import re

    from flax import traverse_util

    rule = re.compile(pattern)

    def mask(params):
        flat = traverse_util.flatten_dict(params, sep="/")
        return traverse_util.unflatten_dict(
            {k: rule.fullmatch(k) is not None for k in flat}, sep="/")

    return mask


def _flat_values(tree):
    from flax import traverse_util

    return traverse_util.flatten_dict(tree).values()


def model_options(config, num_classes: int) -> dict:
    """The options a run builds its model with, from its config (a ConfigDict, or config.json
    as a dict), as `model.json` records them (the dtype by name)."""
    options = {"num_classes": num_classes, "dtype": config.get("dtype", "float32")}
    if config.get("dropout_rate") is not None:
        options["dropout_rate"] = config["dropout_rate"]
    return options


def build_model(r: Resolved):
    from tljax import trained

    return trained.module({"model": r.config.model,
                           "options": model_options(r.config, r.num_classes)})


def initial_variables(r: Resolved, model) -> dict:
    """The run's starting variables: random (`scratch`) or pretrained with a new head."""
    from tljax import pretrained

    c = r.config
    if c.init == "scratch":
        log.info("init: random weights (scratch)")
    weights = None if c.init == "scratch" else c.init

    def read(weights):
        return pretrained.variables(model, c.model, weights, r.image_size, c.seed,
                                    r.num_classes, zero_head=c.head_init == "zeros")

    import jax

    if weights is None or jax.process_count() == 1:
        return read(weights)
    return _read_on_process_0(r, read)


def _read_on_process_0(r: Resolved, read) -> dict:
    """In a multi-process run, process 0 reads the pretrained weights (fetching and converting
    ImageNet's into its cache first if needed) while the others wait, then sends them to every
    process: hosts need neither a shared cache nor the weights file. When process 0 cannot
    read them, every process stops with an error."""
    import jax
    import numpy as np
    import orbax.checkpoint as ocp
    from jax.experimental import multihost_utils

    from tljax import pretrained

    c = r.config
    error = None
    if jax.process_index() == 0:
        try:
            variables = read(c.init)
        except Exception as e:  # the others must hear of it, not wait at the barrier
            error, variables = e, read(None)
        else:
            if c.init == "imagenet":
                log.info("ImageNet weights of %s read by process 0 alone: %s", c.model,
                         pretrained.imagenet_weights(c.model, r.num_classes))
    else:
        variables = read(None)  # the same tree (shapes and dtypes), filled by the broadcast
    # A barrier of the coordination service first, not a collective (whose setup times out in
    # 30 s while process 0 downloads and converts).
    ocp.multihost.sync_global_processes("tljax-pretrained-weights", timeout=3600,
                                        processes=set(range(jax.process_count())))
    if not multihost_utils.broadcast_one_to_all(np.int32(error is None)):
        if error is not None:
            raise error
        raise pretrained.InitError(f"init={c.init}: process 0 could not read the weights; its "
                                   f"log says why")
    variables = multihost_utils.broadcast_one_to_all(variables)
    log.info("pretrained weights sent from process 0 to %d processes", jax.process_count())
    return variables


# --------------------------------------------------------------------------- the run
