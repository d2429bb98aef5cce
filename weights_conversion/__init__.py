"""Convert Keras (.h5, .weights.h5) and torch (.pth) weights to tljax checkpoints.

    python -m weights_conversion --model resnet50 --input resnet50.h5 --output ckpt/resnet50

The conversion itself is the library's (`tljax.weights.convert`, which `tljax.weights.fetch`
also uses for the official files); this package is its command line.
"""

from tljax.weights.convert import convert
from tljax.weights.layer_map import WeightMismatchError
from tljax.weights.readers import UnreadableFileError

__all__ = ["UnreadableFileError", "WeightMismatchError", "convert"]
