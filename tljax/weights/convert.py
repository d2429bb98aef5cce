"""Convert a Keras or torch weight file to a tljax weights checkpoint."""

from __future__ import annotations

import datetime
import logging
import math
import os

import numpy as np

import tljax
from tljax import models, weights
from tljax.models import efficientnet
from tljax.weights import layer_map, readers

log = logging.getLogger("tljax.convert")

TOOL = f"tljax {tljax.__version__} weights_conversion"


def _head_present(sources: list[layer_map.SourceLayer], fmt: str) -> bool:
    names = {s.name for s in sources}
    return ("_fc" in names) if fmt == "torch" else ("predictions" in names)


def _head_classes(sources, fmt: str) -> int | None:
    for s in sources:
        if s.name == ("_fc" if fmt == "torch" else "predictions"):
            bias = s.weights.get("bias", s.weights.get("1"))
            if bias is not None:
                return int(bias.shape[0])
    return None


def _vgg_input_size(sources) -> int | None:
    """VGG's Flatten ties fc1 to the input size: fc1 kernel (s/32 * s/32 * 512, 4096)."""
    for s in sources:
        if s.name == "fc1":
            kernel = s.weights.get("kernel", s.weights.get("0"))
            side = math.isqrt(int(kernel.shape[0]) // 512)
            return side * 32
    return None


def imagenet_normalization_fix(mode: str):
    """Keras's `weights='imagenet'` EfficientNets add `Rescaling(1/sqrt(stddev))` after the
    Normalization layer, because the official files store the ImageNet *stddev* as the
    variance (tensorflow/hub #821, tensorflow/tensorflow #49930). With `mode='auto'` the fix is
    applied when the file's variance is that signature, so a converted official file gives
    what `keras.applications.EfficientNetBx(weights='imagenet')` gives."""
    stddev = np.asarray(efficientnet.IMAGENET_STDDEV_RGB, np.float32)

    def fix(mean, var):
        std = np.maximum(np.sqrt(var), np.float32(1e-7))
        signature = np.allclose(var, stddev, rtol=0, atol=1e-6)
        apply = mode == "on" or (mode == "auto" and signature)
        if apply:
            log.info("EfficientNet: applying Keras's ImageNet rescaling 1/sqrt(stddev) "
                     "(the file stores the stddev as variance)")
            std = std * np.sqrt(stddev)
        fix.applied = apply
        return std.astype(np.float32)

    fix.applied = False
    return fix


def convert(model: str, input_path: str, output_dir: str, fmt: str = "auto",
            imagenet_fix: str = "auto", include_top: bool | None = None,
            source_info: dict | None = None) -> dict:
    """Convert `input_path` for registered `model`; write `output_dir`; return the record.

    `include_top` None follows the file (a notop file gives an include_top=False checkpoint);
    True or False demands it and refuses a file that does not fit. `source_info` is added to
    the record's `source` entry (e.g. the verified MD5 of a download).
    """
    spec = models.spec(model)
    fmt = readers.detect_format(input_path) if fmt == "auto" else fmt
    log.info("reading %s (%s)", input_path, fmt)
    if fmt == "torch":
        if spec.torch_layer_name is None:
            raise readers.UnreadableFileError(
                f"{model}: torch state dicts are supported for the EfficientNet-Lite models "
                f"(lukemelas layout); for {model} convert the Keras .h5 file"
            )
        sources = readers.read_torch(input_path)
    elif fmt == "keras_h5":
        sources = readers.read_keras_h5(input_path)
    elif fmt in ("keras_weights_h5", "keras_archive"):
        sources = None  # needs the Keras model, built below once include_top is known
    else:
        raise ValueError(f"unknown format {fmt!r}; expected keras_h5, keras_weights_h5, "
                         f"keras_archive or torch")
    if fmt != "torch" and spec.keras_layer_name is None:
        raise readers.UnreadableFileError(
            f"{model} has no Keras Applications counterpart; convert a torch state dict"
        )

    if sources is None:
        with readers.keras_weights_file(input_path, fmt) as path:
            sources = readers.read_keras_weights_h5(path, _keras_model(
                spec, _weights_h5_has_top(path), spec.default_size))
    if include_top is None:
        include_top = _head_present(sources, fmt)
    num_classes = _head_classes(sources, fmt) if include_top else 1000
    size = spec.default_size
    if spec.family.name == "vgg" and include_top:
        size = _vgg_input_size(sources) or size
    module = models.create(model, include_top=include_top, num_classes=num_classes or 1000)
    targets = layer_map.target_layers(module, size)

    if fmt == "torch":
        stage_blocks = [t.path[:2] for t in targets if t.path[0].startswith("stage")]
        index = {sb: i for i, sb in enumerate(dict.fromkeys(stage_blocks))}
        name_of = lambda t: spec.torch_layer_name(t.path, index)  # noqa: E731
    else:
        name_of = lambda t: spec.keras_layer_name(t.path)  # noqa: E731
    pairs = layer_map.match(targets, sources, name_of, model)
    fix = imagenet_normalization_fix(imagenet_fix)
    variables = layer_map.assign(pairs, model, normalization_fix=fix)
    record = {
        "model": model,
        "options": ({"include_top": True, "num_classes": num_classes} if include_top
                    else {"include_top": False}),
        "input_size": size,
        "source": {
            "file": os.path.basename(input_path),
            "format": fmt,
            "sha256": weights.sha256(input_path),
            "layers": len(pairs),
            **(source_info or {}),
        },
        "keras_imagenet_rescaling": bool(fix.applied),
        "tool": TOOL,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    weights.save(output_dir, variables, record)
    log.info("wrote %s (%d layers, include_top=%s)", output_dir, len(pairs), include_top)
    return record


def _weights_h5_has_top(path: str) -> bool:
    import h5py

    with h5py.File(path, "r") as h5:
        return any(k == "dense" or k.startswith("dense_") for k in h5.get("layers", {}))


def _keras_model(spec, include_top: bool, size: int):
    os.environ.setdefault("KERAS_BACKEND", "jax")
    import keras

    build = getattr(keras.applications, spec.keras_name)
    return build(weights=None, include_top=include_top, input_shape=(size, size, 3))
