"""Datasets for the training program: where images come from (`sources`) and how they become
batches (`pipeline`)."""

from tljax.datasets.pipeline import Augment, eval_batches, train_batches
from tljax.datasets.sources import DataError, Source, source

__all__ = ["Augment", "DataError", "Source", "eval_batches", "source", "train_batches"]
