"""Benchmark worker: Keras 3 Applications on one backend (`--backend jax|tensorflow|torch`,
set before Keras is imported, hence one process per backend). The application with a head of
`--classes` logits (`weights=None, classes=N`; the layers tljax builds for the same call);
`train_on_batch` with SGD + momentum; the frozen step sets `trainable = False` on every layer but
the head (frozen BatchNorm then runs in inference mode).
Compilation as each backend does it by default for training: XLA (jit) on jax, `tf.function`
without XLA (oneDNN kernels) on tensorflow, eager on torch."""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402

APPS = {"resnet50": "ResNet50", "efficientnet_b0": "EfficientNetB0",
        "inception_v3": "InceptionV3", "vgg19": "VGG19"}


def main() -> None:
    p = common.parser(__doc__)
    p.add_argument("--backend", required=True, choices=["jax", "tensorflow", "torch"])
    args = p.parse_args()
    os.environ["KERAS_BACKEND"] = args.backend
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras
    import numpy as np

    name = f"keras-{args.backend}"
    if args.model not in APPS:
        common.fail(name, args.model, f"Keras Applications has no {args.model}")
    if args.dtype == "bfloat16":
        common.fail(name, args.model, "the Keras peers run in float32 on CPU only")
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (args.batch, args.size, args.size, 3)).astype(np.float32)
    y = rng.integers(0, args.classes, args.batch).astype(np.int32)
    result = {"framework": name, "model": args.model, "batch": args.batch, "size": args.size,
              "device": "cpu", "version": keras.__version__, "dtype": "float32"}

    def sync(out):  # predict_on_batch and train_on_batch return host values: already synced
        return out

    keras.utils.set_random_seed(0)
    model = getattr(keras.applications, APPS[args.model])(
        weights=None, classes=args.classes, classifier_activation=None,
        input_shape=(args.size, args.size, 3))
    # One model for the three measurements (building a Keras application takes seconds):
    # inference first, then the full step, then the frozen step (`compile` again after
    # changing `trainable`, as Keras requires).
    def prepare(kind):
        if kind == "inference":
            def fn():
                return model.predict_on_batch(x)
        else:
            for layer in model.layers[:-1]:  # the frozen step: everything but the head
                layer.trainable = kind == "full_step"
            model.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9),
                          loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                          jit_compile=args.backend == "jax")

            def fn():
                return model.train_on_batch(x, y)
        return fn, {}, lambda: {"peak_memory_mb": common.peak_rss_mb()}

    common.run(args.kinds.split(","), prepare, sync, args, result)


if __name__ == "__main__":
    main()
