"""Classify images with a converted ImageNet model.

    python -m tljax.predict --model efficientnet_lite0 --weights DIR [--top 5] [--json] IMAGE...
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from tljax import imagenet, models, weights, xla_options


def predict(model: str, weights_dir: str, paths: list[str], top: int = 5) -> list[list[dict]]:
    """Top-`top` ImageNet classes of each image in `paths`."""

    rec = weights.record(weights_dir)
    if rec["model"] != model:
        raise ValueError(
            f"{weights_dir} holds weights of {rec['model']!r}, not {model!r}; pass "
            f"--model {rec['model']} or convert weights for {model}"
        )
    options = rec["options"]
    if not options.get("include_top"):
        raise ValueError(
            f"{weights_dir} is a notop checkpoint (no classifier): classifying needs the "
            f"weights with the top; convert the file with the top, or fetch without --notop"
        )
    if options.get("num_classes") != 1000:
        raise ValueError(f"{weights_dir} classifies {options.get('num_classes')} classes, not "
                         f"the 1000 ImageNet classes whose names tljax knows")
    size = rec.get("input_size") or models.spec(model).default_size
    images = np.stack([imagenet.load_image(p, size) for p in paths])
    module = models.create(model, **options)
    variables = weights.load(weights_dir)
    logits = xla_options.jit(module.apply)(variables, models.preprocess(model, images))
    return imagenet.decode(np.asarray(logits), top)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tljax.predict",
        description=(
            "Classify images into the 1000 ImageNet classes with converted weights: each image "
            "is resized (shorter side to size/0.875) and centre-cropped to the model's input "
            "size, preprocessed as the model expects, and the top classes are printed with "
            "their softmax probabilities (as Keras's decode_predictions)."
        ),
    )
    parser.add_argument("--model", required=True, help="registered model name")
    parser.add_argument("--weights", required=True,
                        help="a converted checkpoint (python -m weights_conversion, or "
                             "python -m tljax.weights fetch)")
    parser.add_argument("--top", type=int, default=5, help="how many classes to show (5)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("images", nargs="+", metavar="IMAGE")
    args = parser.parse_args(argv)
    try:
        results = predict(args.model, args.weights, args.images, args.top)
    except (ValueError, weights.WeightsError, imagenet.ImageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps([{"image": p, "predictions": r}
                          for p, r in zip(args.images, results, strict=True)], indent=2))
    else:
        for path, preds in zip(args.images, results, strict=True):
            print(path)
            for p in preds:
                print(f"  {p['probability']:7.2%}  {p['index']:4d}  {p['synset']}  {p['names']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
