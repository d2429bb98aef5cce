"""Parity with Keras Applications for every registered Keras architecture.

Keras 3 builds each model with `weights=None` and a fixed seed, every BatchNorm gets random
statistics and affine parameters, the weights are written in the legacy HDF5 layout of the
official files, converted with the CLI, and both sides run the same raw images through their
own preprocessing: max |difference| <= 1e-4 * max(1, max |Keras output|) in float32, with the
top (logits) and without (pooled features). Sizes are small and some odd, so that TensorFlow's
asymmetric 'SAME' padding is exercised.
"""

from __future__ import annotations

import os

import jax
import keras_reference as kr
import numpy as np
import pytest

from tljax import models, weights
from weights_conversion.__main__ import main as convert_cli

TOLERANCE = 1e-4

# (top size, notop size) per family: small for speed, odd sizes for asymmetric padding.
SIZES = {"vgg": (64, 50), "resnet": (64, 71), "inception": (75, 107), "efficientnet": (64, 67)}
SLOW = {"efficientnet_b6", "efficientnet_b7"}
KERAS_MODELS = [n for n in models.names() if models.spec(n).keras_name]


def _param(name, top):
    marks = [pytest.mark.slow] if name in SLOW else []
    return pytest.param(name, top, id=f"{name}-{'top' if top else 'notop'}", marks=marks)


def convert_and_compare(keras_model, name, include_top, size, tmp_path, pooling="avg",
                        fmt="legacy"):
    if fmt == "legacy":
        path = kr.save_legacy_h5(keras_model, str(tmp_path / f"{name}.h5"))
    elif fmt == "keras":  # Keras 3's own model.save
        path = str(tmp_path / f"{name}.keras")
        keras_model.save(path)
    else:
        path = str(tmp_path / f"{name}.weights.h5")
        keras_model.save_weights(path)
    out_dir = str(tmp_path / "converted")
    assert convert_cli(["--model", name, "--input", path, "--output", out_dir]) == 0
    rec = weights.record(out_dir)
    assert rec["options"]["include_top"] == include_top
    raw = kr.images(3, size)
    expected = kr.run(keras_model, name, raw)
    module = models.create(name, **rec["options"], pooling=None if include_top else pooling)
    got = np.asarray(jax.jit(module.apply)(weights.load(out_dir), models.preprocess(name, raw)))
    assert got.shape == expected.shape
    scale = max(1.0, float(np.abs(expected).max()))
    err = float(np.abs(got - expected).max())
    assert err <= TOLERANCE * scale, f"{name}: max |diff| {err:.3g}, scale {scale:.3g}"
    return rec


@pytest.mark.parametrize("name,include_top",
                         [_param(n, t) for n in KERAS_MODELS for t in (True, False)])
def test_parity_with_keras(name, include_top, tmp_path):
    family = models.spec(name).family.name
    size = SIZES[family][0 if include_top else 1]
    km = kr.build(name, include_top, size, seed=0)
    kr.randomize_statistics(km, seed=1)
    convert_and_compare(km, name, include_top, size, tmp_path)


@pytest.mark.parametrize("name", ["resnet50", "inception_v3", "efficientnet_b0"])
def test_parity_keras3_weights_h5(name, tmp_path):
    """Keras 3 `.weights.h5` files store layers by class and position, not by name."""
    km = kr.build(name, False, SIZES[models.spec(name).family.name][1], seed=2)
    kr.randomize_statistics(km, seed=3)
    convert_and_compare(km, name, False, SIZES[models.spec(name).family.name][1], tmp_path,
                        fmt="weights.h5")


@pytest.mark.parametrize("name,include_top", [("vgg19", True), ("resnet50", False),
                                               ("inception_v3", False),
                                               ("efficientnet_b0", True)])
def test_parity_keras_archive(name, include_top, tmp_path):
    """Keras 3 `.keras` archives (`model.save`): their `model.weights.h5`, read as Keras reads
    it, gives Keras's outputs; a truncated archive is named as such."""
    size = SIZES[models.spec(name).family.name][0 if include_top else 1]
    km = kr.build(name, include_top, size, seed=10)
    kr.randomize_statistics(km, seed=11)
    rec = convert_and_compare(km, name, include_top, size, tmp_path, fmt="keras")
    assert rec["source"]["format"] == "keras_archive"
    whole = (tmp_path / f"{name}.keras").read_bytes()
    cut = tmp_path / "cut.keras"
    cut.write_bytes(whole[: len(whole) // 2])
    from tljax.weights import readers

    with pytest.raises(readers.UnreadableFileError, match="truncated or corrupt"):
        from tljax.weights import convert

        convert.convert(name, str(cut), str(tmp_path / "never"))


def test_parity_max_pooling(tmp_path):
    km = kr.build("resnet50", False, 64, seed=4, pooling="max")
    kr.randomize_statistics(km, seed=5)
    convert_and_compare(km, "resnet50", False, 64, tmp_path, pooling="max")


@pytest.mark.parametrize("name,include_top,size", [
    ("efficientnet_b0", True, 224), ("efficientnet_b1", False, 96)])
def test_efficientnet_official_file_path(name, include_top, size, tmp_path, monkeypatch):
    """Keras's `weights='imagenet'` EfficientNets add a `Rescaling(1/sqrt(stddev))` after the
    Normalization layer because the official files store the stddev as the variance
    (tensorflow/hub #821). A file with that signature must give what Keras gives when it loads
    it through `weights='imagenet'`; Keras's file fetch is pointed at the local file."""
    from keras.src.applications import efficientnet as keras_efficientnet

    from tljax.models.efficientnet import IMAGENET_MEAN_RGB, IMAGENET_STDDEV_RGB

    km = kr.build(name, include_top, size, seed=6)
    kr.randomize_statistics(km, seed=7)
    norm = next(layer for layer in km.layers if type(layer).__name__ == "Normalization")
    count = norm.get_weights()[2]
    norm.set_weights([np.asarray(IMAGENET_MEAN_RGB, np.float32),
                      np.asarray(IMAGENET_STDDEV_RGB, np.float32), count])
    path = kr.save_legacy_h5(km, str(tmp_path / "official_layout.h5"))
    monkeypatch.setattr(keras_efficientnet.file_utils, "get_file", lambda *a, **k: path)
    official = kr.build(name, include_top, size, seed=8, weights="imagenet")
    rescalings = lambda m: sum(type(layer).__name__ == "Rescaling" for layer in m.layers)  # noqa: E731
    assert rescalings(official) == rescalings(km) + 1, "Keras no longer adds the rescaling"
    os.makedirs(tmp_path / "again", exist_ok=True)
    rec = convert_and_compare(official, name, include_top, size, tmp_path / "again")
    assert rec["keras_imagenet_rescaling"] is True


def test_efficientnet_stddev_fix_off_matches_plain_keras(tmp_path):
    """A user's own Keras-trained file (no signature) is not rescaled."""
    km = kr.build("efficientnet_b0", False, 64, seed=9)
    kr.randomize_statistics(km, seed=10)
    rec = convert_and_compare(km, "efficientnet_b0", False, 64, tmp_path)
    assert rec["keras_imagenet_rescaling"] is False
