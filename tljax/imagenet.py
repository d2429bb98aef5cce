"""ImageNet class names and the evaluation-style image loading that `predict` uses."""

from __future__ import annotations

import functools
import os
from importlib import resources

import numpy as np

# Eval transform of the ImageNet literature: resize the shorter side to size / 0.875, then crop
# the centre (224 <- 256).
CROP_FRACTION = 0.875


@functools.cache
def classes() -> list[tuple[str, str]]:
    """(synset, names) for the 1000 ImageNet classes, in Keras's (sorted synset) order."""
    text = resources.files("tljax").joinpath("data/imagenet_classes.tsv").read_text()
    rows = [line.split("\t") for line in text.splitlines() if not line.startswith("#")]
    return [(synset, names) for _, synset, names in rows]


def decode(logits: np.ndarray, top: int = 5) -> list[list[dict]]:
    """Top classes per row of 1000-class logits, as Keras's `decode_predictions` (with the
    softmax probability, the synset, the short name and all names)."""
    logits = np.asarray(logits, np.float64)
    if logits.ndim != 2 or logits.shape[1] != 1000:
        raise ValueError(f"expected (batch, 1000) ImageNet logits, got shape {logits.shape}")
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    table = classes()
    out = []
    for row in probs:
        best = np.argsort(-row)[:top]
        out.append([{
            "index": int(i), "synset": table[i][0], "name": table[i][1].split(",")[0],
            "names": table[i][1], "probability": float(row[i]),
        } for i in best])
    return out


class ImageError(ValueError):
    """An image file is missing or cannot be decoded."""


def load_image(path: str | os.PathLike, size: int) -> np.ndarray:
    """RGB uint8 `size`x`size` image: shorter side resized to size / 0.875, centre crop."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            w, h = im.size
            scale = size / CROP_FRACTION / min(w, h)
            nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
            im = im.resize((nw, nh), Image.BILINEAR)
            left, top = (nw - size) // 2, (nh - size) // 2
            return np.asarray(im.crop((left, top, left + size, top + size)), np.uint8)
    except FileNotFoundError:
        raise ImageError(f"image {path} does not exist") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ImageError(f"image {path} cannot be decoded ({e.__class__.__name__}: {e})") from None
