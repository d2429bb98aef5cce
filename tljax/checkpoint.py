"""Training checkpoints (Orbax): the last K and the best by an evaluation metric.

`WORKDIR/checkpoints/<step>/` holds the whole `TrainState` (step, params, BatchNorm statistics,
optimizer state, and the moving average of the parameters when the run keeps one). Saving is
asynchronous (training goes on while the files are written) and atomic (a checkpoint is
written to a temporary directory and renamed when complete), so a run killed at any moment
leaves only whole checkpoints; leftovers are cleaned up on the next start.

The state is replicated over the devices, so a checkpoint is independent of the device count:
`restore` lays it out over whatever mesh the restarted run has.
"""

from __future__ import annotations

import logging
from typing import Any

import jax
import numpy as np

from tljax import storage

log = logging.getLogger("tljax.checkpoint")


class CheckpointError(ValueError):
    """A checkpoint that does not fit the run restoring it."""


class Checkpoints:
    """Save and restore `TrainState`s under `directory`.

    Keeps the `keep` most recent checkpoints plus the one with the highest `best_metric`
    among those saved with evaluation metrics.
    """

    def __init__(self, directory: str, keep: int = 3, best_metric: str = "top1",
                 asynchronous: bool = True, read_only: bool = False):
        """`read_only`: for readers beside a run (evaluate, predict, export), which must
        neither remove the run's unfinished checkpoints nor wait for other processes."""
        import orbax.checkpoint as ocp
        from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

        self.directory = storage.absolute(directory)
        self.best_metric = best_metric
        policy = pp.AnyPreservationPolicy([
            pp.LatestN(n=keep),
            pp.BestN(get_metric_fn=lambda m: m[best_metric], n=1,
                     keep_checkpoints_without_metrics=False),
        ])
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                preservation_policy=policy, cleanup_tmp_directories=not read_only,
                # best_fn makes the manager write each checkpoint's metrics (best_step).
                best_fn=lambda m: m[best_metric], best_mode="max",
                enable_async_checkpointing=asynchronous, read_only=read_only,
                create=not read_only,
                **({"multiprocessing_options": this_process_only()} if read_only else {}),
            ),
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def best_step(self) -> int | None:
        """The kept step with the highest `best_metric` (None when none has metrics)."""
        best, best_value = None, -np.inf
        for step in self.manager.all_steps():
            metrics = self.manager.metrics(step)
            if metrics and self.best_metric in metrics and metrics[self.best_metric] > best_value:
                best, best_value = step, metrics[self.best_metric]
        return best

    def steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: Any, metrics: dict | None = None) -> None:
        import orbax.checkpoint as ocp

        if step in self.manager.all_steps():
            return
        metrics = {k: float(v) for k, v in metrics.items()} if metrics else None
        self.manager.save(step, args=ocp.args.StandardSave(state), metrics=metrics, force=True)

    def restore(self, step: int, target: Any) -> Any:
        """The checkpoint at `step`, shaped and placed like `target` (a pytree of arrays or
        `jax.ShapeDtypeStruct`s with shardings). Shapes must match; a mismatch is a
        CheckpointError naming the first differing entry."""
        import orbax.checkpoint as ocp

        abstract = jax.tree.map(_abstract, target)
        meta = self._check_shapes(step, abstract)
        wanted = getattr(abstract, "ema_params", None) is not None
        if wanted != bool(meta.get("ema_params")):
            raise CheckpointError(
                f"checkpoint {self.directory}/{step} was written "
                f"{'without' if wanted else 'with'} a moving average of the parameters, this "
                f"run {'keeps' if wanted else 'keeps no'} one: resume with the config.ema_decay "
                f"it was written with (WORKDIR/config.json), or start a new workdir")
        if not wanted and "ema_params" not in meta:
            # Written before TrainState had a moving average: Orbax refuses a target with a
            # field the checkpoint lacks, even an empty one, unless restoring partially.
            args = ocp.args.PyTreeRestore(
                item=abstract,
                restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
                partial_restore=True)
            return ocp.PyTreeCheckpointer().restore(self._item(step), args=args)
        return self.manager.restore(step, args=ocp.args.StandardRestore(abstract))

    def restore_variables(self, step: int, target: Any, params: str = "raw") -> dict:
        """Only `{'params', 'batch_stats'}` of the checkpoint at `step`, shaped and placed like
        `target`: what evaluating or exporting needs, whatever optimizer state (and phase of
        the run) the checkpoint was written with. `params='ema'` takes the parameters from
        the checkpoint's moving average (`TrainState.ema_params`) instead."""
        import orbax.checkpoint as ocp

        abstract = jax.tree.map(_abstract, target)
        meta = self._check_shapes(step, abstract)
        key = {"raw": "params", "ema": "ema_params"}[params]
        if not meta.get(key):
            raise CheckpointError(
                f"checkpoint {self.directory}/{step} holds no moving average of the "
                f"parameters (the run had no config.ema_decay): pass --params raw (params='raw')")
        abstract = {key: abstract["params"], "batch_stats": abstract["batch_stats"]}
        args = ocp.args.PyTreeRestore(
            item=abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
            partial_restore=True)
        restored = ocp.PyTreeCheckpointer().restore(self._item(step), args=args)
        return {"params": restored[key], "batch_stats": restored["batch_stats"]}

    def _item(self, step: int) -> str:
        return storage.join(self.directory, str(step), "default")

    def _check_shapes(self, step: int, abstract: Any) -> dict:
        """The checkpoint's tree metadata, once its parameter and statistic shapes are checked
        against `abstract`'s."""
        import orbax.checkpoint as ocp

        meta = ocp.StandardCheckpointer().metadata(self._item(step)).item_metadata
        meta = meta.tree if hasattr(meta, "tree") else meta
        saved, wanted = {}, {}
        for part in ("params", "batch_stats"):
            saved.update(_shapes(_get(meta, part), part))
            wanted.update(_shapes(_get(abstract, part), part))
        for path in sorted(set(saved) | set(wanted)):
            if saved.get(path) != wanted.get(path):
                raise CheckpointError(
                    f"checkpoint {self.directory}/{step} does not fit this run: {path} is "
                    f"{_fmt(saved.get(path))} in the checkpoint, {_fmt(wanted.get(path))} in "
                    f"the model. Resume with the configuration it was written with, or start a "
                    f"new workdir"
                )
        return meta

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def steps_in(directory: str) -> list[int]:
    """The complete checkpoint steps under `directory` (a workdir's `checkpoints/`), sorted."""
    import orbax.checkpoint as ocp

    return sorted(ocp.utils.checkpoint_steps(storage.path(directory)))


def this_process_only():
    """Orbax options for a save or restore by this process alone, of plain arrays: converted
    weights, which process 0 writes while the others wait elsewhere, or the pretrained
    weights that process 0 reads for every process of a run."""
    import orbax.checkpoint as ocp

    me = jax.process_index()
    return ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me})


def restore_numpy(step_dir: str, keys: tuple[str, ...] | None = None) -> dict:
    """The tree in a checkpoint step directory (`.../checkpoints/<step>`) as host numpy arrays,
    whatever devices it was saved from, read by this process alone; with `keys`, only those
    top-level entries that the checkpoint holds (`('params', 'batch_stats')`: no optimizer
    state is read)."""
    import orbax.checkpoint as ocp

    path = storage.join(step_dir, "default")
    checkpointer = ocp.StandardCheckpointer(multiprocessing_options=this_process_only())
    meta = checkpointer.metadata(path).item_metadata
    tree = meta.tree if hasattr(meta, "tree") else meta

    def empty(tree):
        return jax.tree.map(lambda a: np.empty(a.shape, a.dtype), tree,
                            is_leaf=lambda a: hasattr(a, "shape") and hasattr(a, "dtype"))

    if keys is None:
        return checkpointer.restore(path, empty(tree))
    target = {k: empty(_get(tree, k)) for k in keys if _get_or_none(tree, k)}
    args = ocp.args.PyTreeRestore(
        item=target, partial_restore=True,
        restore_args=jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target))
    one = this_process_only()
    checkpointer = ocp.Checkpointer(ocp.PyTreeCheckpointHandler(multiprocessing_options=one),
                                    multiprocessing_options=one)
    return checkpointer.restore(path, args=args)


def _abstract(x):
    if isinstance(x, jax.ShapeDtypeStruct):
        return x
    return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=getattr(x, "sharding", None))


def _get_or_none(tree, name):
    try:
        return _get(tree, name)
    except AttributeError:
        return None


def _get(tree, name):
    try:
        return tree[name]
    except (KeyError, TypeError):
        return getattr(tree, name)


def _shapes(tree, prefix: str) -> dict[str, tuple]:
    leaves = jax.tree_util.tree_flatten_with_path(
        tree, is_leaf=lambda x: hasattr(x, "shape") and not isinstance(x, dict))[0]
    return {prefix + "/" + jax.tree_util.keystr(k, simple=True, separator="/"): tuple(v.shape)
            for k, v in leaves if hasattr(v, "shape")}


def _fmt(shape) -> str:
    return "absent" if shape is None else str(shape)
