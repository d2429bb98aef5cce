"""tljax's native weight checkpoints: an Orbax checkpoint of the variables plus a JSON record.

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
    """Write `variables` and `record` to `directory` (which must not exist yet)."""
    import orbax.checkpoint as ocp

    directory = os.path.abspath(directory)
    if os.path.exists(os.path.join(directory, VARIABLES)):
        raise WeightsError(f"{directory} already holds a checkpoint; remove it or choose another")
    os.makedirs(directory, exist_ok=True)
    tree = {c: variables[c] for c in ("params", "batch_stats") if c in variables}
    tree = _to_numpy(tree)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(os.path.join(directory, VARIABLES), tree)
    checkpointer.wait_until_finished()
    record = {"format": FORMAT, **record}
    with open(os.path.join(directory, RECORD), "w") as f:
        json.dump(record, f, indent=2, sort_keys=True)
        f.write("\n")
    return directory


def _to_numpy(tree):
    if isinstance(tree, dict):
        return {k: _to_numpy(v) for k, v in tree.items()}
    return np.asarray(tree)


def record(directory: str | os.PathLike) -> dict[str, Any]:
    """The JSON record of a converted checkpoint (model, options, source, tool)."""
    path = os.path.join(directory, RECORD)
    if not os.path.isdir(directory):
        raise WeightsError(f"no weights checkpoint at {directory}: the directory does not exist")
    if not os.path.exists(path):
        raise WeightsError(
            f"{directory} is not a tljax weights checkpoint: {RECORD} is missing. Convert a "
            f"Keras or torch file with `python -m weights_conversion --model NAME --input FILE "
            f"--output DIR`"
        )
    with open(path) as f:
        rec = json.load(f)
    if rec.get("format") != FORMAT:
        raise WeightsError(f"{path}: unknown format {rec.get('format')!r}, expected {FORMAT!r}")
    return rec


def load(directory: str | os.PathLike) -> dict:
    """The variables (`params`, `batch_stats`) of a converted checkpoint, as numpy arrays."""
    import orbax.checkpoint as ocp

    record(directory)  # validates the directory
    path = os.path.join(os.path.abspath(directory), VARIABLES)
    if not os.path.isdir(path):
        raise WeightsError(f"{directory}: the '{VARIABLES}' checkpoint is missing")
    try:
        return ocp.StandardCheckpointer().restore(path)
    except Exception as e:  # orbax raises many types; the user needs the path and the cause
        raise WeightsError(f"{directory}: could not read the checkpoint ({e})") from e
