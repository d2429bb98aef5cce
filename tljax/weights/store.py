"""tljax's native weight checkpoints: an Orbax checkpoint of the variables plus a JSON record,
in a local folder or in object storage (`gs://bucket/weights/resnet50`).

Layout of a converted checkpoint directory:
    DIR/variables/          Orbax (StandardCheckpointer) checkpoint of {'params', 'batch_stats'}
    DIR/tljax_weights.json  model name and options, source file and its sha256, tool version
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import numpy as np

from tljax import storage

RECORD = "tljax_weights.json"
VARIABLES = "variables"
FORMAT = "tljax-weights/1"


class WeightsError(ValueError):
    """A checkpoint directory is missing, incomplete or not a tljax weights checkpoint."""


def sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def save(directory: str | os.PathLike, variables: dict, record: dict[str, Any]) -> str:
    """Write `variables` and `record` to `directory` (which must not hold a checkpoint yet)."""
    import orbax.checkpoint as ocp

    from tljax.checkpoint import this_process_only

    directory = storage.absolute(directory)
    if storage.exists(storage.join(directory, VARIABLES)):
        raise WeightsError(f"{directory} already holds a checkpoint; remove it or choose another")
    storage.makedirs(directory)
    tree = {c: variables[c] for c in ("params", "batch_stats") if c in variables}
    tree = _to_numpy(tree)
    checkpointer = ocp.StandardCheckpointer(multiprocessing_options=this_process_only())
    checkpointer.save(storage.join(directory, VARIABLES), tree)
    checkpointer.wait_until_finished()
    record = {"format": FORMAT, **record}
    # The record last: a directory that has it holds a complete checkpoint.
    storage.write_text(storage.join(directory, RECORD),
                       json.dumps(record, indent=2, sort_keys=True) + "\n")
    return directory


def _to_numpy(tree):
    if isinstance(tree, dict):
        return {k: _to_numpy(v) for k, v in tree.items()}
    return np.asarray(tree)


def record(directory: str | os.PathLike) -> dict[str, Any]:
    """The JSON record of a converted checkpoint (model, options, source, tool)."""
    directory = storage.absolute(directory)
    path = storage.join(directory, RECORD)
    if not storage.exists(path):
        if not storage.exists(directory):
            raise WeightsError(f"no weights checkpoint at {directory}: it does not exist")
        raise WeightsError(
            f"{directory} is not a tljax weights checkpoint: {RECORD} is missing. Convert a "
            f"Keras or torch file with `python -m weights_conversion --model NAME --input FILE "
            f"--output DIR`"
        )
    try:
        rec = json.loads(storage.read_text(path))
    except json.JSONDecodeError as e:
        raise WeightsError(f"{path} is not valid JSON ({e}); convert the weights again") from e
    if rec.get("format") != FORMAT:
        raise WeightsError(f"{path}: unknown format {rec.get('format')!r}, expected {FORMAT!r}")
    return rec


def load(directory: str | os.PathLike) -> dict:
    """The variables (`params`, `batch_stats`) of a converted checkpoint, as numpy arrays."""
    import orbax.checkpoint as ocp

    from tljax.checkpoint import this_process_only

    record(directory)  # validates the directory
    path = storage.join(directory, VARIABLES)
    if not storage.exists(path):
        raise WeightsError(f"{directory}: the '{VARIABLES}' checkpoint is missing")
    try:
        return ocp.StandardCheckpointer(multiprocessing_options=this_process_only()).restore(
            path)
    except Exception as e:  # orbax raises many types; the user needs the path and the cause
        raise WeightsError(f"{directory}: could not read the checkpoint ({e})") from e
