"""Benchmark worker: tljax, the way the training program runs it: the forward pass under
`jax.jit`, the train step of `tljax.train_step` compiled by `parallel.compile_train_step` (the
default shard_map form, state donated) on one device, freezing from `tljax.freeze` presets
(`none`: full fine-tune, `backbone`: head only). bfloat16 computation on accelerators.

Also reported: model FLOPs of each program (convolutions and matrix products counted on its
jaxpr, `flops.py`), XLA's byte count of the compiled program, its memory (arguments +
outputs + temporaries - donated, from XLA's memory analysis), and the device's measured matmul
peak (a large matmul of random data timed in the same process), from which the driver computes MFU,
and the memory bandwidth (a large elementwise pass), which with XLA's byte count gives each
program's memory-traffic floor."""

from __future__ import annotations

import functools
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from tljax import host_memory  # noqa: E402

host_memory.keep_freed_memory()  # as the training program: before any thread allocates

import common  # noqa: E402
import flops  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from tljax import cpu, freeze, models, parallel, xla_options  # noqa: E402
from tljax import train_step as steps  # noqa: E402


def best_time(call, repeat: int = 5) -> float:
    """Seconds of the fastest of `repeat` runs of `call()` (after one untimed run)."""
    jax.block_until_ready(call())
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        jax.block_until_ready(call())
        best = min(best, time.perf_counter() - t)
    return best


def matmul_peak(dtype) -> float:
    """FLOP/s of the best of a few square matmuls of random data on the default device (constant
    data can run faster than real data on GPUs)."""
    n = 2048 if jax.default_backend() == "cpu" else 8192
    a = jax.random.normal(jax.random.key(1), (n, n), dtype)
    f = jax.jit(lambda a: a @ a)
    return 2 * n**3 / best_time(lambda: f(a))


def copy_bandwidth() -> float:
    """Bytes/s read plus written by an in-place elementwise pass over a large float32 array: the
    memory ceiling beside `matmul_peak`. The input is donated, so that the pass writes over it
    (a fresh output buffer each call would time the allocator's page faults on CPU)."""
    n = (64 if jax.default_backend() == "cpu" else 1024) * 2**20 // 4
    f = jax.jit(lambda x: x * 0.5 + 1.0, donate_argnums=0)
    x = [jax.random.normal(jax.random.key(2), (n,), jnp.float32)]

    def once():
        x[0] = f(x[0])
        return x[0]

    return 2 * 4 * n / best_time(once)


def analysis(lower_fn) -> dict:
    """Trace+compile time, XLA's FLOP and byte counts and memory of the program `lower_fn()`
    lowers (the same the first call then finds in JAX's cache). XLA's FLOPs are kept for
    reference only (`xla_flops`); MFU uses `flops.model_flops` (see there why)."""
    t = time.perf_counter()
    compiled = lower_fn().compile()
    out = {"compile_s": time.perf_counter() - t}
    cost = compiled.cost_analysis()
    cost = (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}
    if "flops" in cost:
        out["xla_flops"] = float(cost["flops"])
    if "bytes accessed" in cost:
        out["bytes_accessed"] = float(cost["bytes accessed"])
    mem = compiled.memory_analysis()
    if mem is not None:
        out["xla_memory_mb"] = (mem.argument_size_in_bytes + mem.output_size_in_bytes
                                + mem.temp_size_in_bytes - mem.alias_size_in_bytes) / 2**20
    return out


def setup(model: str, size: int, batch: int, classes: int, dtype=jnp.float32):
    """The model with random weights and one random batch: what every program runs on."""
    module = models.create(model, num_classes=classes, dtype=dtype)
    variables = models.random_variables(module, size)
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (batch, size, size, 3)).astype(np.float32)
    labels = rng.integers(0, classes, batch).astype(np.int32)
    return module, variables, images, labels


def program(kind: str, module, variables, images, labels, device, bn: str = "follow",
            family=None):
    """A no-argument call running `kind` once, `analysis` of its compiled program, and a
    no-argument function that lowers that program again (for `profile_ops.py`)."""
    if kind == "inference":
        def apply(v, x):
            return module.apply(v, x, train=False)

        forward = xla_options.jit(apply, devices=[device])
        v, x = jax.device_put((variables, images), device)
        lower = functools.partial(forward.lower, v, x)
        info = analysis(lower)
        info["flops"] = flops.model_flops(apply, variables, images)
        return (lambda: forward(v, x)), info, lower
    labels_tree = freeze.resolve(variables["params"], "none" if kind == "full_step" else "backbone")
    tx = steps.optimizer(labels_tree, lambda lr: optax.sgd(lr, momentum=0.9), 0.01)
    # --bn inference (ablation): every BatchNorm on its moving statistics, as if all were frozen.
    bn_labels = (jax.tree.map(lambda _: freeze.FROZEN, labels_tree) if bn == "inference"
                 else labels_tree)
    config = steps.StepConfig(model=module, tx=tx, trainable=freeze.trainable(labels_tree),
                              frozen_bn=freeze.frozen_batchnorm(
                                  bn_labels, variables.get("batch_stats", {}), family))
    step, put_state, put_batch = parallel.compile_train_step(config, devices=[device])
    state = steps.create_state(variables, tx)
    host_batch = {"image": images, "label": labels}
    holder = [put_state(state)]  # donated, replaced each call
    batch = put_batch(host_batch)
    key = jax.random.key(0)
    def lower():
        return step.lower(holder[0], batch, key)

    info = analysis(lower)
    info["flops"] = flops.model_flops(functools.partial(steps.train_step, config=config), state,
                                      host_batch, key, axis_env=[(config.axis_name, 1)])

    def once():
        holder[0], metrics = step(holder[0], batch, key)
        return metrics

    return once, info, lower


def main() -> None:
    p = common.parser(__doc__)
    p.add_argument("--bn", choices=["follow", "inference"], default="follow",
                   help="follow: BatchNorm follows the freeze (the library's default); "
                   "inference: every BatchNorm layer on its moving statistics, in every program "
                   "(an ablation: what batch statistics cost in the full step)")
    args = p.parse_args()
    accel = jax.default_backend() != "cpu"
    dtype = {"auto": jnp.bfloat16 if accel else jnp.float32, "float32": jnp.float32,
             "bfloat16": jnp.bfloat16}[args.dtype]
    device = jax.devices()[0]
    module, variables, images, labels = setup(args.model, args.size, args.batch, args.classes,
                                              dtype)
    result = {"framework": "tljax", "model": args.model, "batch": args.batch, "size": args.size,
              "device": device.device_kind, "version": jax.__version__,
              "dtype": jnp.dtype(dtype).name, "peak_flops": matmul_peak(dtype),
              # The C++ kernels (tljax.native), or the pure-JAX form without them; with or
              # without the AVX-512 ones (the direct convolution and product).
              "native_kernels": cpu.native(),
              "native_avx512": cpu.direct(),
              "bandwidth": copy_bandwidth()}

    def sync(out):
        return jax.block_until_ready(out)

    def prepare(kind):
        # The matmul peak again before each program, the best kept: one measurement taken in a
        # slow spell of a shared machine would inflate every MFU of the run.
        result["peak_flops"] = max(result["peak_flops"], matmul_peak(dtype))
        # Compiled ahead of the first call (for the analyses): `common.run` counts the
        # compile_s in the first call, like the peers'.
        fn, info, _ = program(kind, module, variables, images, labels, device, args.bn,
                              models.family(args.model))

        def after():
            if not (accel and "xla_memory_mb" in info):
                return {"peak_memory_mb": common.peak_rss_mb()}
            # JAX cannot reset the device's high-water mark between programs: report each
            # program's own footprint (XLA's memory analysis) and the process's peak beside it.
            out = {"peak_memory_mb": info["xla_memory_mb"]}
            stats = device.memory_stats() if hasattr(device, "memory_stats") else None
            if stats and "peak_bytes_in_use" in stats:
                out["device_peak_mb"] = stats["peak_bytes_in_use"] / 2**20
            return out

        return fn, info, after

    common.run(args.kinds.split(","), prepare, sync, args, result)


if __name__ == "__main__":
    main()
