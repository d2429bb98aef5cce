"""Flax ports of Keras Applications: `create`, `load` (a pretrained model in one call),
`preprocess`, `info`, `names`, and the registry a new family joins (`register`, `family`;
docs/adding_a_model.md)."""

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

__all__ = ["REGISTRY", "Family", "ModelSpec", "create", "family", "info", "load", "names",
           "preprocess", "random_variables", "register", "spec"]


def load(name: str, weights: str | None = "imagenet", seed: int = 0, **options):
    """`(module, variables)` of model `name` with `weights` ('imagenet', a path, or None):
    `tljax.pretrained.load`, which fetches and converts official weights on first use."""
    from tljax import pretrained  # it reads weights, which import the models: import it here

    return pretrained.load(name, weights, seed, **options)
