"""Flax ports of Keras Applications: `create`, `preprocess`, `info`, `names`."""

from tljax.models.preprocessing import preprocess
from tljax.models.registry import REGISTRY, ModelSpec, create, info, init, names, spec

__all__ = ["REGISTRY", "ModelSpec", "create", "info", "init", "names", "preprocess", "spec"]
