"""The default linear probe (`configs/finetune.py:freeze=backbone`): on the bundled Lite0 and
digits, within 1 point of scikit-learn's logistic regression fitted to convergence on the same
features, with a training loss that never rises above its start."""

from __future__ import annotations

import json
import os
import warnings

import numpy as np
import pytest
from processes import config_module


@pytest.mark.slow
def test_default_probe_reaches_the_logistic_regression_optimum(tmp_path, monkeypatch):
    from sklearn.linear_model import LogisticRegression

    from tljax import datasets, feature_cache, models, run, train
    from tljax.datasets import pipeline

    monkeypatch.setenv("TLJAX_CACHE", str(tmp_path / "cache"))
    config = config_module().get_config("freeze=backbone")
    assert (config.optimizer.name, config.head_init, config.steps) == ("adam", "zeros", 2000)
    r = run.resolve(config)
    assert run.phases(config)[0].cached
    workdir = str(tmp_path / "probe")
    summary = train.train_and_evaluate(config, workdir)

    # The reference: the same pooled features (evaluation crop, inference mode), C = 1.
    model = run.build_model(r)
    features = feature_cache.jit_features(
        model, run.initial_variables(r, model), lambda x: models.preprocess(config.model, x))
    fitted = {}
    for split in (r.train_split, r.test_split):
        batches, _ = pipeline.eval_batches(r.source.records(split, datasets.budget(1.0)), 64,
                                           r.image_size, config.eval_crop)
        fitted[split] = feature_cache.compute(features, batches)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = LogisticRegression(C=1.0, max_iter=5000).fit(*fitted[r.train_split])
    optimum = reference.score(*fitted[r.test_split])
    test = summary["final"]["test"]["top1"]
    assert test >= optimum - 0.01, (test, optimum)

    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        losses = [m["train/loss"] for m in map(json.loads, f) if "train/loss" in m]
    assert losses and max(losses) <= np.log(10) + 0.05, losses[:10]  # a zero head: ln 10
    assert np.mean(losses[-5:]) < 0.1
