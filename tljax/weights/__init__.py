"""Converted weights: `load(dir)` gives the Flax variables of a tljax weights checkpoint.

`python -m tljax.weights fetch NAME [--notop]` downloads, verifies and converts the official
Keras Applications file.
"""

from tljax.weights.store import WeightsError, load, record, save, sha256

__all__ = ["WeightsError", "load", "record", "save", "sha256"]
