"""Command line: `python -m weights_conversion --model NAME --input FILE --output DIR`."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from tljax import models
from tljax.weights import WeightsError
from tljax.weights.convert import convert
from tljax.weights.layer_map import WeightMismatchError
from tljax.weights.readers import UnreadableFileError


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m weights_conversion",
        description=(
            "Convert a Keras Applications weight file (legacy .h5 as published by Keras, or a "
            "Keras 3 .weights.h5) or an EfficientNet-Lite torch state dict into a tljax weights "
            "checkpoint (Orbax) that tljax.weights.load() reads. Every layer is matched and "
            "every shape checked; a file of another architecture, a truncated file or a "
            "missing layer is refused. A notop file gives an include_top=False checkpoint."
        ),
        epilog="Models: " + ", ".join(models.names()),
    )
    parser.add_argument("--model", required=True, help="registered model name, e.g. resnet50")
    parser.add_argument("--input", required=True, help="the .h5, .weights.h5, .keras or .pth file")
    parser.add_argument("--output", required=True, help="directory to create")
    parser.add_argument("--format", default="auto",
                        choices=["auto", "keras_h5", "keras_weights_h5", "keras_archive", "torch"],
                        help="input format (default: detected from the file's content)")
    parser.add_argument(
        "--imagenet-rescaling", default="auto", choices=["auto", "on", "off"],
        help="EfficientNet B: apply the extra 1/sqrt(stddev) input rescaling that Keras adds "
             "for its official ImageNet files (auto: when the file carries their signature)",
    )
    top = parser.add_mutually_exclusive_group()
    top.add_argument("--include-top", dest="include_top", action="store_true", default=None,
                     help="require the file to have the classifier (default: follow the file)")
    top.add_argument("--no-include-top", dest="include_top", action="store_false",
                     help="require a notop file")
    parser.add_argument("-v", "--verbose", action="store_true", help="log each step")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        record = convert(args.model, args.input, args.output, args.format,
                         args.imagenet_rescaling, include_top=args.include_top)
    except (ValueError, UnreadableFileError, WeightMismatchError, WeightsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"output": args.output, **record}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
