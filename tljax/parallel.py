"""Compiling the per-device steps across devices and hosts: the one place that knows about them.

Two forms of the same pure functions (`tljax.train_step`):
- `pmap`: `jax.pmap(step, axis_name)`, arrays with a leading local-device axis;
- `shard_map`: `jax.jit(jax.shard_map(step, mesh, ...))` over a one-dimensional mesh of all
  devices, the state replicated (`P()`) and the batch split on its first axis (`P(axis)`).

Gradient scaling under shard_map: with `check_vma=True` (JAX's default), differentiating
inside the body with respect to a replicated (device-invariant) parameter makes JAX insert a
`psum` over the axis into the gradient, so the per-device `pmean` that the step applies (and
`pmap` needs) would return the *sum* over devices, i.e. the device count times the gradient.
The step is written in the pmap convention (local gradients, explicit `pmean`), so shard_map
is built with `check_vma=False`, under which gradients stay local. `tests/test_parallel.py`
compares one device with eight and fails if either form scales gradients by the device count.

Many hosts: every process calls `jax.distributed.initialize` first, then builds the same step;
each process passes its own shard of the global batch (`shard` for pmap, `put_batch` for
shard_map, which assembles the global array from the process-local pieces).

Default form (`compile_train_step`): shard_map. Measured on this project's 2-core CPU machine
with 8 virtual devices, a one-block-per-stage ResNet at 64x64, global batch 32, SGD (median of
6 steps after compilation; `form` comparison script in the commit that set this default):
    pmap       unsynced BN: 1880 ms/step (max 7464), compile 8.0 s; synced: 1960 ms, 7.9 s
    shard_map  unsynced BN: 1750 ms/step (max 1795), compile 7.1 s; synced: 1807 ms, 7.7 s
shard_map is ~7% faster and compiles no slower (pmap's 7.5 s outlier was a second compilation
of the step, since removed: see `replicate`); it is also the form
current JAX recommends and into which pmap itself now lowers.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from tljax import train_step as steps
from tljax import xla_options

AXIS = "batch"


class BatchSizeError(ValueError):
    """The global batch does not divide evenly over the devices."""


def check_batch(global_batch: int, devices: int) -> int:
    """The per-device batch; an error that says what to change when it does not divide."""
    if global_batch % devices:
        lower = global_batch - global_batch % devices
        raise BatchSizeError(
            f"the global batch size {global_batch} does not divide over {devices} devices; use "
            f"a multiple of {devices} (e.g. {lower or devices} or {lower + devices})"
        )
    return global_batch // devices


def shard(batch: dict, devices: int) -> dict:
    """Reshape a (process-local) batch to (devices, batch / devices, ...) for pmap."""
    def split(x):
        x = np.asarray(x)
        per = check_batch(x.shape[0], devices)
        return x.reshape((devices, per) + x.shape[1:])

    return jax.tree.map(split, batch)


def replicate(tree, devices: list | None = None, axis: str = AXIS):
    """Put `tree` on each local device, with the leading device axis that pmap expects.

    `axis` must be the pmap's `axis_name`: pmap returns its outputs sharded over a mesh axis of
    that name, and an input laid out under another name is a different sharding, so the second
    call (fed the first call's output) would trace and compile the step a second time."""
    devices = devices or jax.local_devices()
    # One slice per device along the leading axis (pmap's layout; PmapSharding is gone).
    sharding = NamedSharding(Mesh(np.asarray(devices), (axis,)), P(axis))
    return jax.tree.map(
        lambda x: jax.device_put(np.broadcast_to(np.asarray(x), (len(devices),) + np.shape(x)),
                                 sharding), tree)


def unreplicate(tree):
    """The first replica of a pmapped tree, as host numpy arrays."""
    return jax.tree.map(lambda x: np.asarray(x[0]), tree)


def pmap_train_step(config: steps.StepConfig) -> Callable:
    """`step(state, batch, rng)` compiled with pmap; the state buffers are donated."""
    fn = functools.partial(steps.train_step, config=config)
    return jax.pmap(fn, axis_name=config.axis_name, donate_argnums=(0,), in_axes=(0, 0, None))


def pmap_eval_step(config: steps.StepConfig) -> Callable:
    return jax.pmap(functools.partial(steps.eval_step, config=config),
                    axis_name=config.axis_name)


def mesh(devices: list | None = None, axis: str = AXIS) -> Mesh:
    devices = devices if devices is not None else jax.devices()
    return Mesh(np.asarray(devices), (axis,))


def shard_map_train_step(config: steps.StepConfig, mesh_: Mesh) -> Callable:
    """`step(state, batch, rng)` as jit(shard_map) over `mesh_`; the state is donated.

    The state is replicated, the batch split over the mesh axis (global arrays)."""
    fn = functools.partial(steps.train_step, config=config)
    body = jax.shard_map(fn, mesh=mesh_, in_specs=(P(), P(config.axis_name), P()),
                         out_specs=(P(), P()), check_vma=False)
    return xla_options.jit(body, devices=mesh_.devices.flat, donate_argnums=(0,))


def shard_map_eval_step(config: steps.StepConfig, mesh_: Mesh) -> Callable:
    fn = functools.partial(steps.eval_step, config=config)
    return xla_options.jit(jax.shard_map(fn, mesh=mesh_, in_specs=(P(), P(config.axis_name)),
                                         out_specs=P(), check_vma=False),
                           devices=mesh_.devices.flat)


def put_replicated(tree, mesh_: Mesh):
    """`tree` (host arrays, equal on every process) replicated over the mesh."""
    return jax.device_put(tree, NamedSharding(mesh_, P()))


def put_batch(batch: dict, mesh_: Mesh, axis: str = AXIS):
    """The global batch laid out over the mesh from this process's part of it (in a single
    process, the whole batch)."""
    local = len(next(iter(batch.values())))
    check_batch(local * jax.process_count(), mesh_.size)
    sharding = NamedSharding(mesh_, P(axis))
    if jax.process_count() == 1:
        return jax.device_put(batch, sharding)
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch)


def compile_train_step(config: steps.StepConfig, form: str = "shard_map",
                       devices: list | None = None) -> tuple[Callable, Callable, Callable]:
    """The compiled train step in `form` ('shard_map', the measured default, or 'pmap'), with
    the functions that lay out the state and a batch for it: `(step, put_state, put_batch)`."""
    if form == "pmap":
        local = devices or jax.local_devices()
        return (pmap_train_step(config), lambda s: replicate(s, local, config.axis_name),
                lambda b: shard(b, len(local)))
    if form == "shard_map":
        m = mesh(devices, config.axis_name)
        return (shard_map_train_step(config, m), lambda s: put_replicated(s, m),
                lambda b: put_batch(b, m, config.axis_name))
    raise ValueError(f"form must be 'shard_map' or 'pmap', got {form!r}")
