"""A model that tljax made, read back for use: a training workdir's checkpoint, an exported
directory (`python -m tljax.export`) or converted ImageNet weights, each with what its outputs
mean (the model and its options, the class names, the evaluation preprocessing).

    from tljax import trained
    t = trained.load("runs/flowers")          # the checkpoint the run selected on validation
    logits = t.module.apply(t.variables, t.preprocess(images), train=False)
    t.classes[int(logits[0].argmax())]

A run writes `WORKDIR/model.json` (`model_record`) when it starts: the registered model and
the options it was built with, the input size and evaluation crop, the preprocessing and the
class names (folder names, TFDS label names). An export's `tljax_weights.json` holds the same
fields, so that `weights.load`, `init=`, `predict` and `models.load` read it as any converted
weights directory.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from typing import Any

from tljax import storage

log = logging.getLogger("tljax.trained")

RECORD = "model.json"  # in a workdir, beside config.json
FORMAT = "tljax-model/1"


class LoadError(ValueError):
    """A path that holds no model tljax can read, or not the one asked for."""


@dataclasses.dataclass
class Trained:
    """A model and its variables, with what its outputs mean."""

    module: Any
    variables: dict  # {'params', 'batch_stats'}, numpy arrays
    record: dict  # model, options, input_size, eval_crop, preprocessing, classes
    origin: str  # what was read: 'WORKDIR step 240 (moving average)', a weights directory

    @property
    def model(self) -> str:
        return self.record["model"]

    @property
    def classes(self) -> list[str] | None:
        """The name of each output, in order; None when the record has none."""
        return self.record.get("classes")

    @property
    def input_size(self) -> int:
        from tljax import models

        return self.record.get("input_size") or models.spec(self.model).default_size

    def preprocess(self, images):
        """The model's input for uint8 RGB `images` (N, size, size, 3)."""
        from tljax import models

        return models.preprocess(self.model, images)


def model_record(r) -> dict:
    """`WORKDIR/model.json` of a resolved run (`run.Resolved`): what its checkpoints are a model
    of and what their outputs mean."""
    from tljax import run

    classes = list(r.source.class_names)
    classes += [str(k) for k in range(len(classes), r.num_classes)]  # outputs past the data's
    return _record(run.config_record(r), classes)


def _record(config: dict, classes: list[str] | None) -> dict:
    """The model record of a run's resolved config (config.json) and its class names."""
    from tljax import run
    from tljax.models import registry

    return {"format": FORMAT, "model": config["model"],
            "options": {"include_top": True,
                        **run.model_options(config, config["num_classes"])},
            "input_size": config["image_size"], "eval_crop": config.get("eval_crop", 0.875),
            "preprocessing": registry.spec(config["model"]).numerics.preprocessing,
            "classes": classes, "dataset": config.get("dataset")}


def is_workdir(path: str) -> bool:
    return storage.exists(storage.join(path, "config.json"))


def workdir_record(workdir: str) -> dict:
    """`model.json` of `workdir`, or for a workdir written before it existed the same fields
    from its config.json (without class names)."""
    path = storage.join(workdir, RECORD)
    if storage.exists(path):
        return json.loads(storage.read_text(path))
    log.warning("%s has no %s (written before runs recorded one): its outputs are class "
                "indices, without names", workdir, RECORD)
    return _record(_config(workdir), None)


def _config(workdir: str) -> dict:
    path = storage.join(workdir, "config.json")
    if not storage.exists(path):
        raise LoadError(f"{workdir} is not a training workdir: config.json is missing")
    return json.loads(storage.read_text(path))


def selected_params(workdir: str) -> str:
    """The parameters `workdir`'s run selected on: 'raw', or 'ema' (their moving average)."""
    from tljax import run

    if not is_workdir(workdir):  # checkpoints without their config: as before select_on
        return run.IMPLIED["select_on"]
    return _config(workdir).get("select_on", run.IMPLIED["select_on"])


def choose_step(workdir: str, checkpoint: str | int = "best") -> int:
    """The step of `workdir` that `checkpoint` names: 'best' (selected on validation by the
    run; the latest when none has metrics), 'latest', or a step number it holds."""
    from tljax import checkpoint as ckpt_lib

    directory = storage.join(workdir, "checkpoints")
    steps = ckpt_lib.steps_in(directory) if storage.exists(directory) else []
    if not steps:
        raise LoadError(f"{workdir} has no checkpoint yet")
    if checkpoint == "latest":
        return steps[-1]
    if checkpoint == "best":  # the metrics the run saved with each checkpoint
        ckpts = ckpt_lib.Checkpoints(directory, asynchronous=False, read_only=True)
        try:
            best = ckpts.best_step()
        finally:
            ckpts.close()
        return steps[-1] if best is None else best
    try:
        step = int(checkpoint)
    except ValueError:
        raise LoadError(f"checkpoint {checkpoint!r}: 'best', 'latest' or a step number") from None
    if step not in steps:
        raise LoadError(f"{workdir} has no checkpoint at step {step}; it has {steps}")
    return step


def checkpoint_variables(path: str, checkpoint: str | int = "best",
                         params: str = "") -> tuple[dict, str, str]:
    """`(variables, description, kind)` of a training checkpoint, as numpy arrays: `path` is a
    workdir (its step that `checkpoint` names, with `params`: 'raw', 'ema', or '' for those
    the run selected on) or one checkpoint step directory (`WORKDIR/checkpoints/240`, its raw
    parameters unless `params='ema'`); `kind` is the parameters read, 'raw' or 'ema'. No
    optimizer state is read."""
    from tljax import checkpoint as ckpt_lib

    if params not in ("", "raw", "ema"):
        raise LoadError(f"params={params!r}: 'raw', 'ema' (the moving average), or '' for "
                        f"those the run selected on")
    if is_workdir(path) or storage.exists(storage.join(path, "checkpoints")):
        step = choose_step(path, checkpoint)
        params = params or selected_params(path)
        step_dir, what = storage.join(path, "checkpoints", str(step)), f"{path} step {step}"
    else:
        step_dir, what, params = path, path, params or "raw"
    if not storage.exists(storage.join(step_dir, "default")):
        raise LoadError(f"{path} is neither a training workdir nor one of its checkpoint step "
                        f"directories (no {step_dir}/default)")
    key = {"raw": "params", "ema": "ema_params"}[params]
    tree = ckpt_lib.restore_numpy(step_dir, (key, "batch_stats"))
    if not tree.get(key):
        raise LoadError(f"{what} holds no moving average of the parameters (the run had no "
                        f"config.ema_decay): ask for the raw ones (params='raw', --params raw)")
    if params == "ema":
        what += " (moving average)"
    return {"params": tree[key], "batch_stats": tree.get("batch_stats", {})}, what, params


def load(path: str, checkpoint: str | int = "best", params: str = "",
         model: str | None = None) -> Trained:
    """The model at `path`: a training workdir (its `checkpoint`: 'best', 'latest' or a step;
    its `params`: 'raw', 'ema' or '' for those selected on), an exported directory or
    converted weights. With `model`, the path must hold that model (else a `LoadError`
    naming both)."""
    from tljax import weights

    path = storage.absolute(path)
    if not storage.exists(path):
        raise LoadError(f"{path} does not exist: give a training workdir, an exported "
                        f"directory (python -m tljax.export) or converted weights")
    if storage.exists(storage.join(path, weights.store.RECORD)):
        record = weights.record(path)
        if not record.get("options", {}).get("include_top", True):
            raise LoadError(f"{path} is a notop checkpoint (include_top=False: no classifier): "
                            f"classifying needs the weights with the top; convert the file "
                            f"with the top, or fetch without --notop")
        _check_model(path, record["model"], model)
        if checkpoint not in ("best", None) or params:
            raise LoadError(f"{path} is a weights directory, one set of parameters: a step and "
                            f"a kind of parameters (--step, --params) apply to training "
                            f"workdirs")
        variables, origin = weights.load(path), path
        converted = "eval_crop" not in record  # not a tljax.export of a run
        if converted and record["options"].get("num_classes") == 1000:
            from tljax import imagenet

            record = {**record, "classes": [n.split(",")[0] for _, n in imagenet.classes()],
                      "imagenet": True}
    elif is_workdir(path):
        record = workdir_record(path)
        _check_model(path, record["model"], model)
        variables, origin, _ = checkpoint_variables(path, checkpoint, params)
    else:
        raise LoadError(f"{path} holds no model: not a training workdir (config.json), nor "
                        f"an exported or converted weights directory ({weights.store.RECORD})")
    return Trained(module(record), variables, record, origin)


def add_arguments(parser, step: str = "--step", of: str = "") -> None:
    """`--step` (or `step`) and `--params` on `parser`: which checkpoint of a workdir, and
    which of its parameters (`load`, `checkpoint_variables`); `of` prefixes their help."""
    parser.add_argument(step, default="best",
                        help=f"{of}'best' (the checkpoint the run selected on validation; the "
                             f"default), 'latest', or a step number the workdir holds")
    parser.add_argument("--params", default="", choices=["", "raw", "ema"],
                        help=f"{of}'raw' parameters or 'ema' (their moving average); default: "
                             f"those the run selected on (config.select_on)")


def module(record: dict):
    """The Flax module a model record describes."""
    import jax.numpy as jnp

    from tljax import models

    options = dict(record["options"])
    if "dtype" in options:
        options["dtype"] = jnp.dtype(options["dtype"])
    return models.create(record["model"], **options)


def _check_model(path: str, holds: str, wanted: str | None) -> None:
    if wanted and wanted != holds:
        raise LoadError(f"{path} holds weights of {holds!r}, not {wanted!r}: leave out --model "
                        f"(the record names the model) or give weights of {wanted}")


def export(workdir: str, out: str, checkpoint: str | int = "best", params: str = "") -> dict:
    """Write `workdir`'s checkpoint (see `load`) to `out` as a weights directory whose record
    also holds the class names and the evaluation preprocessing; no optimizer state.
    Returns the record."""
    import datetime

    import tljax
    from tljax import weights

    if not is_workdir(workdir):
        raise LoadError(f"{workdir} is not a training workdir: config.json is missing")
    record = workdir_record(workdir)
    variables, origin, _ = checkpoint_variables(workdir, checkpoint, params)
    config = _config(workdir)
    record = {k: v for k, v in record.items() if k != "format"}
    record.update(
        source={"workdir": storage.absolute(workdir), "checkpoint": origin,
                "dataset": config.get("dataset"), "init": config.get("init")},
        tool=f"tljax {tljax.__version__} export",
        created=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"))
    weights.save(out, variables, record)
    return record
