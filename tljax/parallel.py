"""Compiling the per-device steps across devices and hosts: the one place that knows about them.

Two forms of the same pure functions (`tljax.train_step`):
- `pmap`: `jax.pmap(step, axis_name)`, arrays with a leading local-device axis;
- `shard_map`: `jax.jit(jax.shard_map(step, mesh, ...))` over a one-dimensional mesh of all
  devices, the state replicated (`P()`) and the batch split on its first axis (`P(axis)`); the
  leaves the step carries over untouched (frozen parameters, their moving averages, frozen
  statistics) go in without coming back out (`ShardMapTrainStep`).

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

Default form (`compile_train_step`): shard_map, the form current JAX recommends and into
which pmap itself now lowers; on CPU it also ran faster than pmap (docs/performance.md).
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
    """`eval(states, batch) -> [sums]` (`train_step.eval_steps`) compiled with pmap."""
    return jax.pmap(functools.partial(steps.eval_steps, config=config),
                    axis_name=config.axis_name)


def mesh(devices: list | None = None, axis: str = AXIS) -> Mesh:
    devices = devices if devices is not None else jax.devices()
    return Mesh(np.asarray(devices), (axis,))


class CarriedLeafError(RuntimeError):
    """A leaf `train_step.carried_paths` names as carried over came back changed."""


class ShardMapTrainStep:
    """`step(state, batch, rng) -> (state, metrics)`: `train_step` as jit(shard_map) over a
    mesh, the state replicated and the batch split over the mesh axis (global arrays).

    The leaves the step carries over untouched (`train_step.carried_paths`: the frozen
    parameters and their moving averages, frozen BatchNorm statistics) go in as a separate
    argument that is neither donated nor returned: the new state holds the very arrays it was
    given for them. The others (step, trained parameters and their averages, statistics that
    train, optimizer state) are donated and replaced.
    With a frozen backbone that is nearly every leaf, and each one costs host time at the call
    boundary, where nothing computes.

    When the step is traced, each carried leaf is checked to come back as the same traced value
    it went in as, so a carried set that disagreed with `train_step` would stop with
    `CarriedLeafError`, never silently drop an update.
    """

    def __init__(self, config: steps.StepConfig, mesh_: Mesh):
        self.config, self.mesh = config, mesh_
        self._plans: dict = {}  # the state's treedef -> (changed, carried, compiled function)

    def _plan(self, state, treedef):
        plan = self._plans.get(treedef)
        if plan is not None:
            return plan
        paths = [jax.tree_util.keystr(p, simple=True, separator="/")
                 for p, _ in jax.tree_util.tree_flatten_with_path(state)[0]]
        carried_paths = steps.carried_paths(state, self.config)
        carried = tuple(i for i, p in enumerate(paths) if p in carried_paths)
        changed = tuple(sorted(set(range(len(paths))) - set(carried)))
        fn = functools.partial(steps.train_step, config=self.config)

        def body(changed_leaves, carried_leaves, batch, rng):
            leaves = [None] * len(paths)
            for i, x in zip(changed + carried, [*changed_leaves, *carried_leaves], strict=True):
                leaves[i] = x
            new_state, metrics = fn(treedef.unflatten(leaves), batch, rng)
            new_leaves = treedef.flatten_up_to(new_state)
            for i in carried:
                if new_leaves[i] is not leaves[i]:
                    raise CarriedLeafError(
                        f"train_step changed {paths[i]}, which "
                        "train_step.carried_paths lists as carried over untouched: the two "
                        "must agree")
            return [new_leaves[i] for i in changed], metrics

        axis = self.config.axis_name
        mapped = jax.shard_map(body, mesh=self.mesh, in_specs=(P(), P(), P(axis), P()),
                               out_specs=(P(), P()), check_vma=False)
        plan = (changed, carried, xla_options.jit(mapped, devices=self.mesh.devices.flat,
                                                  donate_argnums=(0,)))
        self._plans[treedef] = plan
        return plan

    def _args(self, state, batch, rng):
        leaves, treedef = jax.tree.flatten(state)
        changed, carried, fn = self._plan(state, treedef)
        args = ([leaves[i] for i in changed], [leaves[i] for i in carried], batch, rng)
        return leaves, treedef, changed, fn, args

    def __call__(self, state, batch, rng):
        leaves, treedef, changed, fn, args = self._args(state, batch, rng)
        new_leaves, metrics = fn(*args)
        for i, x in zip(changed, new_leaves, strict=True):
            leaves[i] = x
        return treedef.unflatten(leaves), metrics

    def lower(self, state, batch, rng):
        """The compiled program's `jax.stages.Lowered` for these arguments."""
        *_, fn, args = self._args(state, batch, rng)
        return fn.lower(*args)


def shard_map_train_step(config: steps.StepConfig, mesh_: Mesh) -> ShardMapTrainStep:
    """`step(state, batch, rng)` as jit(shard_map) over `mesh_` (`ShardMapTrainStep`); the
    state's changing leaves are donated."""
    return ShardMapTrainStep(config, mesh_)


def shard_map_eval_step(config: steps.StepConfig, mesh_: Mesh) -> Callable:
    """`eval(states, batch) -> [sums]`: `train_step.eval_steps` (each state of the list on the
    batch) as jit(shard_map) over `mesh_`."""
    fn = functools.partial(steps.eval_steps, config=config)
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


def process_rows(mesh_: Mesh, global_batch: int, axis: str = AXIS) -> tuple[int, int]:
    """[start, stop) of the rows of a global batch that this process's devices hold when
    `put_batch` lays it out on `mesh_`: the rows this process's input must make. An error if
    they are not one contiguous range (a mesh whose devices are not grouped by process)."""
    index = NamedSharding(mesh_, P(axis)).addressable_devices_indices_map((global_batch,))
    spans = sorted((s[0].start or 0, global_batch if s[0].stop is None else s[0].stop)
                   for s in index.values())
    for (_, stop), (start, _) in zip(spans, spans[1:], strict=False):
        if stop != start:
            raise ValueError(f"this process's devices hold rows {spans} of the global batch, "
                             f"not one range: order the mesh's devices by process")
    return spans[0][0], spans[-1][1]


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
