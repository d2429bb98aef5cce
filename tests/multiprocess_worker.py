"""One process of the multi-process test: `python multiprocess_worker.py PID NPROC PORT OUT`.

Each process has 4 CPU devices, joins the others through `jax.distributed.initialize` on
127.0.0.1 with gloo collectives, feeds its own shard of each global batch, runs three steps of
the tiny fine-tuning setup with pmap, and process 0 writes the parameters to OUT (.npz).
"""

import os
import sys

pid, nproc, port, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"

import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=nproc,
                           process_id=pid, initialization_timeout=120)

import numpy as np  # noqa: E402
from flax import traverse_util  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
import tiny_training as tt  # noqa: E402

from tljax import parallel  # noqa: E402
from tljax import train_step as steps  # noqa: E402

assert jax.process_count() == nproc and jax.device_count() == 4 * nproc
_, variables, _, tx, batches = tt.setup()
per_process = tt.GLOBAL_BATCH // nproc
for form in ("pmap", "shard_map"):
    step, put_state, put_batch = parallel.compile_train_step(
        tt.config(sync_bn=True), form, jax.local_devices() if form == "pmap" else jax.devices())
    state = put_state(steps.create_state(variables, tx))
    for batch in batches:
        mine = {k: v[pid * per_process:(pid + 1) * per_process] for k, v in batch.items()}
        state, metrics = step(state, put_batch(mine), jax.random.key(1))
    params = state.params
    if form == "pmap":
        params = jax.tree.map(lambda x: x.addressable_shards[0].data[0], params)
    else:
        params = jax.tree.map(lambda x: x.addressable_shards[0].data, params)
    if pid == 0:
        flat = traverse_util.flatten_dict(jax.tree.map(np.asarray, params), sep="/")
        np.savez(out.replace(".npz", f"_{form}.npz"), **flat)
jax.distributed.shutdown()
