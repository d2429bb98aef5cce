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
    `tljax.pretrained.load`, which fetches and converts official weights on first use.

    Given instead the path of a model tljax trained (a training workdir: the checkpoint its
    run selected on) or exported (`python -m tljax.export`), `(module, variables, classes)`:
    the model its record names, with the options it was trained with, and its class names
    (`tljax.trained.load` reads other checkpoints and the record itself)."""
    import os

    if name not in REGISTRY and (os.sep in name or "://" in name or os.path.exists(name)):
        from tljax import trained

        if weights != "imagenet" or options:
            raise TypeError(f"models.load({name!r}): a trained model's path takes no weights= "
                            f"or options (its record names them)")
        t = trained.load(name)
        return t.module, t.variables, t.classes
    from tljax import pretrained  # it reads weights, which import the models: import it here

    return pretrained.load(name, weights, seed, **options)
