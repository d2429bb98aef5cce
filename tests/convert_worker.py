"""One process of the shared-cache test: `python convert_worker.py PID NPROC PORT`.

With `$TLJAX_CACHE` in a bucket, the processes of a run ask for EfficientNet-Lite0's ImageNet
weights as the training program does: process 0 converts them into the bucket while the
others wait, then every process reads them. Prints the number of arrays read.
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

from flax import traverse_util  # noqa: E402

from tljax import pretrained, run  # noqa: E402

logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
resolved = types.SimpleNamespace(config=types.SimpleNamespace(model="efficientnet_lite0"),
                                 num_classes=10)
run._convert_on_one_host(resolved)
variables, where = pretrained.read("imagenet", "efficientnet_lite0", 10)
print(f"process {pid} read {len(traverse_util.flatten_dict(variables))} arrays from {where}")
jax.distributed.shutdown()
