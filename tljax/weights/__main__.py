"""`python -m tljax.weights fetch NAME [--notop]`: download, verify and convert official weights."""

from __future__ import annotations

import argparse
import logging
import sys

from tljax.models import registry


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tljax.weights",
        description="Manage pretrained weights.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    f = sub.add_parser(
        "fetch",
        help="download an official Keras Applications file, verify its MD5, convert it",
        description=(
            "Download the official Keras Applications ImageNet weights of NAME into the cache "
            "($TLJAX_CACHE, default ~/.cache/tljax), verify the MD5 that Keras publishes, "
            "convert them to a tljax checkpoint and print its path. The base address can be "
            "changed with $TLJAX_WEIGHTS_URL (a mirror, or a local server)."
        ),
    )
    f.add_argument("name", help="model name: " + ", ".join(
        n for n in registry.names() if registry.spec(n).weights))
    f.add_argument("--notop", action="store_true", help="the file without the classifier")
    f.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from tljax.weights.fetch import FetchError, fetch

    try:
        path = fetch(args.name, notop=args.notop, progress=not args.quiet)
    except (FetchError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
