"""Flax ports of Keras Applications: `create`, `preprocess`, `info`, `names`, and the
registry a new family joins (`register`, `family`; docs/adding_a_model.md)."""

from tljax.models.family import Family
from tljax.models.preprocessing import preprocess
from tljax.models.registry import (
    REGISTRY,
    ModelSpec,
    create,
    family,
    info,
    names,
    random_variables,
    register,
    spec,
)

__all__ = ["REGISTRY", "Family", "ModelSpec", "create", "family", "info", "names", "preprocess",
           "random_variables", "register", "spec"]
