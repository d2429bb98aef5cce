"""Throughput of tljax's forward pass and fine-tuning steps (a benchmark, not a test).

For each model at its size and batch: images/s of the forward pass (inference), of a full
fine-tune step (everything trains) and of a frozen-backbone step (only the head trains, frozen
BatchNorm in inference mode), each the median of timed steps after compilation (min and max
shown), the compile times, and the ratio frozen-step time / forward time (target <= 1.25).

    python scripts/benchmark.py       # ResNet50 and EfficientNet-B0, 224x224, batch 16
    python scripts/benchmark.py --models resnet50 --steps 3 --json bench.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import jax
import numpy as np
import optax

from tljax import freeze, models, parallel
from tljax import train_step as steps


def timed(fn, *args, steps: int):
    """Compile time, then per-step times of `steps` calls after one warm-up call."""
    t = time.perf_counter()
    out = fn(*args)
    jax.block_until_ready(out)
    compile_s = time.perf_counter() - t
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        out = fn(*args)
        jax.block_until_ready(out)
        times.append(time.perf_counter() - t)
    return compile_s, times


def _stepper(step, state, batch, key):
    """A no-argument call that advances `state` by one step (the state is donated)."""
    holder = [state]

    def once():
        holder[0], metrics = step(holder[0], batch, key)
        return metrics

    return once


def bench_model(name: str, batch: int, size: int | None, steps_n: int, classes: int):
    spec = models.spec(name)
    size = size or spec.default_size
    module = models.create(name, num_classes=classes)
    variables = models.random_variables(module, size)
    rng = np.random.default_rng(0)
    images = models.preprocess(name, rng.integers(0, 256, (batch, size, size, 3), np.uint8))
    labels = rng.integers(0, classes, batch).astype(np.int32)
    result = {"model": name, "batch": batch, "size": size}

    forward = jax.jit(lambda v, x: module.apply(v, x, train=False))
    c, t = timed(forward, variables, images, steps=steps_n)
    result["forward"] = {"compile_s": c, "times": t}

    device = jax.devices()[:1]
    for kind, preset in (("full_step", "none"), ("frozen_step", "backbone")):
        labels_tree = freeze.resolve(variables["params"], preset)
        tx = steps.optimizer(labels_tree, lambda lr: optax.sgd(lr, momentum=0.9), 0.01)
        config = steps.StepConfig(
            model=module, tx=tx, trainable=freeze.trainable(labels_tree),
            frozen_bn=freeze.frozen_batchnorm(labels_tree, variables["batch_stats"]))
        step = parallel.pmap_train_step(config)
        state = parallel.replicate(steps.create_state(variables, tx), device, config.axis_name)
        batch_d = parallel.shard({"image": np.asarray(images), "label": labels}, 1)

        c, t = timed(_stepper(step, state, batch_d, jax.random.key(0)), steps=steps_n)
        result[kind] = {"compile_s": c, "times": t}
    for kind in ("forward", "full_step", "frozen_step"):
        t = result[kind]["times"]
        result[kind].update(median_s=statistics.median(t), min_s=min(t), max_s=max(t),
                            images_per_s=batch / statistics.median(t))
    result["frozen_over_forward"] = (result["frozen_step"]["median_s"]
                                     / result["forward"]["median_s"])
    return result


def print_table(results):
    print(f"\n{'model':<16} {'what':<12} {'img/s':>8} {'median s':>9} {'min s':>7} "
          f"{'max s':>7} {'compile s':>9}")
    for r in results:
        for kind in ("forward", "full_step", "frozen_step"):
            k = r[kind]
            print(f"{r['model']:<16} {kind:<12} {k['images_per_s']:>8.1f} {k['median_s']:>9.3f} "
                  f"{k['min_s']:>7.3f} {k['max_s']:>7.3f} {k['compile_s']:>9.1f}")
        ok = "meets" if r["frozen_over_forward"] <= 1.25 else "MISSES"
        print(f"{r['model']:<16} frozen-step time / forward time = "
              f"{r['frozen_over_forward']:.2f} ({ok} the 1.25 target)")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["resnet50", "efficientnet_b0"])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=None, help="default: the model's own")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per figure")
    parser.add_argument("--classes", type=int, default=10, help="classes of the new head")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    print(f"jax {jax.__version__} on {jax.devices()[0].platform} "
          f"({platform.processor() or platform.machine()}, {jax.device_count()} device(s))")
    results = []
    for name in args.models:
        print(f"benchmarking {name} ...", flush=True)
        results.append(bench_model(name, args.batch, args.size, args.steps, args.classes))
    print_table(results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"jax": jax.__version__, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
