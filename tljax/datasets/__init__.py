"""Datasets for the training program: where images come from (`sources`), random access to
them (`records`), how they are decoded and cropped (`images`) and how they become batches
(`pipeline`)."""

from tljax.datasets.pipeline import Augment, eval_batches, train_batches
from tljax.datasets.records import DEFAULT_BUDGET_GB, Records, budget
from tljax.datasets.sources import DataError, Source, source

__all__ = ["DEFAULT_BUDGET_GB", "Augment", "DataError", "Records", "Source", "budget",
           "eval_batches", "source", "train_batches"]
