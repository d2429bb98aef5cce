"""Export a trained model: `python -m tljax.export WORKDIR OUT`.

  python -m tljax.export runs/flowers exported/flowers            # the selected checkpoint
  python -m tljax.export runs/flowers exported/flowers_240 --step 240 --params raw

OUT is a weights directory, as `weights_conversion` writes them: the parameters and BatchNorm
statistics of one checkpoint (no optimizer state) and a record (`tljax_weights.json`) naming
the model, its options, the input size and evaluation crop, and the class names. Read it with
`python -m tljax.predict --weights OUT`, `tljax.models.load(OUT)`, `tljax.weights.load(OUT)`,
or start a run from it (`init=OUT`). OUT may be in a bucket (`gs://`).
"""

from __future__ import annotations

import argparse
import sys

from tljax import storage, trained, weights


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tljax.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("workdir", help="a training workdir")
    parser.add_argument("out", help="the directory to write (it must not hold weights yet)")
    trained.add_arguments(parser)
    args = parser.parse_args(argv)

    try:
        record = trained.export(args.workdir, args.out, args.step, args.params)
    except (trained.LoadError, weights.WeightsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    size = sum(storage.files(args.out).values())
    classes = record.get("classes")
    print(f"wrote {storage.absolute(args.out)} ({size / 2**20:.1f} MiB): {record['model']}, "
          f"{record['options']['num_classes']} classes"
          + (f" ({', '.join(classes[:5])}{', ...' if len(classes) > 5 else ''})"
             if classes else "")
          + f", from {record['source']['checkpoint']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
