"""Flax ports of Keras Applications: `create`, `preprocess`, `info`, `names`."""

from tljax.models.preprocessing import preprocess
from tljax.models.registry import REGISTRY, ModelSpec, create, info, names, random_variables, spec

__all__ = ["REGISTRY", "ModelSpec", "create", "info", "names", "preprocess", "random_variables",
           "spec"]
