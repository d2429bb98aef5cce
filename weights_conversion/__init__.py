"""Convert Keras (.h5, .weights.h5) and torch (.pth) weights to tljax checkpoints.

    python -m weights_conversion --model resnet50 --input resnet50.h5 --output ckpt/resnet50
"""

from weights_conversion.convert import convert
from weights_conversion.readers import UnreadableFileError

__all__ = ["UnreadableFileError", "convert"]
