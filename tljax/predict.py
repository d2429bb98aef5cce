"""Classify images with a model tljax trained, exported or converted.

  python -m tljax.predict --weights runs/flowers photos/           # a workdir's selected model
  python -m tljax.predict --weights exported/flowers --top 3 --json a.jpg b.png
  python -m tljax.predict --weights runs/flowers --step latest --params raw a.jpg
  python -m tljax.predict --weights ~/.cache/tljax/weights/resnet50 cat.jpg   # ImageNet

`--weights` is a training workdir (the checkpoint the run selected on validation, unless
`--step` names another), a directory `python -m tljax.export` wrote, or converted weights
(`python -m tljax.weights fetch`, `python -m weights_conversion`). The model, its class names
and its preprocessing come from that directory's record; `--model` only checks it. Images
are files or folders (searched for .jpg, .jpeg, .png, .bmp, .gif). A trained model's images
are prepared as its run evaluated them (the central `eval_crop` of the shorter side, resized
to the input size by the input pipeline's own ops); with converted ImageNet weights, as the
ImageNet literature does (shorter side to size / 0.875, centre crop). The top classes are
printed with their softmax probabilities (ImageNet's also with their synsets, as Keras's
`decode_predictions`).
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from tljax import imagenet, storage, trained, weights, xla_options

BATCH = 32  # images per call of the model


def image_files(paths: list[str]) -> list[str]:
    """`paths` with each folder (local or in a bucket) replaced by the images below it, sorted,
    as a folder dataset finds them."""
    from tljax.datasets.sources import IMAGE_EXTENSIONS

    out = []
    for p in paths:
        if storage.path(p).is_dir():
            found = sorted(storage.join(p, rel) for rel in storage.files(p)
                           if rel.lower().endswith(IMAGE_EXTENSIONS))
            if not found:
                raise imagenet.ImageError(f"folder {p} holds no image (files ending in "
                                          f"{', '.join(IMAGE_EXTENSIONS)})")
            out += found
        else:
            out.append(p)
    return out


def load_images(model: trained.Trained, paths: list[str]) -> np.ndarray:
    """uint8 (N, size, size, 3): each image prepared as `model`'s record says."""
    size = model.input_size
    crop = model.record.get("eval_crop")
    if crop is None:  # converted weights: ImageNet's evaluation crop
        return np.stack([imagenet.load_image(p, size) for p in paths])
    try:
        import tensorflow as tf
    except ImportError:
        raise trained.LoadError(
            "a trained model's images are prepared with the input pipeline's TensorFlow ops, "
            "and TensorFlow is not installed: pip install 'tljax[data]'") from None

    from tljax.datasets import images

    out = []
    for p in paths:
        try:
            data = storage.read_bytes(p)
            out.append(images.eval_image(tf.constant(data), size, crop).numpy())
        except FileNotFoundError:
            raise imagenet.ImageError(f"image {p} does not exist") from None
        except (tf.errors.InvalidArgumentError, tf.errors.UnknownError) as e:
            raise imagenet.ImageError(
                f"image {p} cannot be decoded ({e.message.splitlines()[0]})") from None
    return np.stack(out)


def logits(model: trained.Trained, paths: list[str]) -> np.ndarray:
    """float32 (N, classes): `model`'s logits of each image."""
    apply = xla_options.jit(lambda v, x: model.module.apply(v, model.preprocess(x)))
    out = []
    for i in range(0, len(paths), BATCH):
        batch = load_images(model, paths[i:i + BATCH])
        n = len(batch)
        if n < BATCH and len(paths) > BATCH:  # one compiled shape for every batch
            batch = np.concatenate([batch, np.zeros((BATCH - n, *batch.shape[1:]), np.uint8)])
        out.append(np.asarray(apply(model.variables, batch), np.float32)[:n])
    return np.concatenate(out)


def decode(model: trained.Trained, scores: np.ndarray, top: int = 5) -> list[list[dict]]:
    """The top `top` classes of each row of `scores` (logits): index, name, probability (and
    ImageNet's synset and names)."""
    if model.record.get("imagenet"):
        return imagenet.decode(scores, top)
    classes = model.classes
    probs = np.exp(scores - scores.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    return [[{"index": int(i), "name": classes[i] if classes else str(int(i)),
              "probability": float(row[i])} for i in np.argsort(-row)[:top]]
            for row in probs]


def predict(weights_path: str, paths: list[str], top: int = 5, model: str | None = None,
            checkpoint: str = "best", params: str = "") -> list[list[dict]]:
    """Top-`top` classes of each image in `paths` (files; see `image_files` for folders)."""
    m = trained.load(weights_path, checkpoint, params, model)
    return decode(m, logits(m, paths), top)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tljax.predict", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", required=True,
                        help="a training workdir, an exported directory, or converted weights")
    parser.add_argument("--model", default=None,
                        help="the registered model PATH must hold (default: the one its "
                             "record names)")
    trained.add_arguments(parser, of="of a workdir: ")
    parser.add_argument("--top", type=int, default=5, help="how many classes to show (5)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("images", nargs="+", metavar="IMAGE_OR_FOLDER")
    args = parser.parse_args(argv)
    try:
        paths = image_files(args.images)
        results = predict(args.weights, paths, args.top, args.model, args.step, args.params)
    except (ValueError, weights.WeightsError, imagenet.ImageError, trained.LoadError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps([{"image": p, "predictions": r}
                          for p, r in zip(paths, results, strict=True)], indent=2))
        return 0
    for path, preds in zip(paths, results, strict=True):
        print(path)
        for p in preds:
            synset = f"  {p['synset']}" if "synset" in p else ""
            print(f"  {p['probability']:7.2%}  {p['index']:4d}{synset}  "
                  f"{p.get('names', p['name'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
