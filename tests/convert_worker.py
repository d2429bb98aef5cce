"""One process of the shared-cache test: `python convert_worker.py PID NPROC PORT`.

The processes of a run ask for EfficientNet-Lite0's ImageNet weights as the training program
does: process 0 converts them into its cache (`$TLJAX_CACHE`) while the others wait, then sends
them to every process. Prints the number of arrays each process holds and the sum of those
below the (new) head.
"""

import os
import sys
import types

pid, nproc, port = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"

import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=nproc,
                           process_id=pid, initialization_timeout=120)

import logging  # noqa: E402

import numpy as np  # noqa: E402
from flax import traverse_util  # noqa: E402

from tljax import run  # noqa: E402
from tljax.models import registry  # noqa: E402

logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
config = types.SimpleNamespace(model="efficientnet_lite0", init="imagenet", seed=0,
                               head_init="random")
resolved = types.SimpleNamespace(config=config, num_classes=10, image_size=32)
arrays = traverse_util.flatten_dict(
    run.initial_variables(resolved, registry.create("efficientnet_lite0", num_classes=10)))
total = sum(float(np.asarray(a, np.float64).sum()) for k, a in arrays.items() if "head" not in k)
print(f"process {pid} holds {len(arrays)} arrays, backbone sum {total:.6f}")
jax.distributed.shutdown()
