"""The data-parallel step: one device against eight (pmap and shard_map, with and without
synchronised BatchNorm), gradient scaling, and freezing that leaves frozen weights and
statistics bit-identical."""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest
from flax import traverse_util
from processes import finish, free_port
from tiny_training import GLOBAL_BATCH, SIZE, config, setup, tiny_model  # noqa: F401

from tljax import freeze, parallel
from tljax import train_step as steps
from tljax.models.layers import TrainMode


def run_pmap(devices, sync_bn, n_steps=3, preset="up_to:stage2", history=False):
    """The state after `n_steps` steps (host arrays); with `history`, the list of the states
    after each step (so for the other runners)."""
    _, variables, _, tx, batches = setup(preset)
    cfg = config(sync_bn, preset)
    step = parallel.pmap_train_step(cfg)
    state = parallel.replicate(steps.create_state(variables, tx), devices)
    states = []
    for b in batches[:n_steps]:
        state, _ = step(state, parallel.shard(b, len(devices)), jax.random.key(1))
        states.append(parallel.unreplicate(state))  # host copies: the next step donates
    return states if history else states[-1]


def run_shard_map(devices, sync_bn, n_steps=3, check_vma=False, history=False):
    _, variables, _, tx, batches = setup()
    cfg = config(sync_bn)
    mesh = parallel.mesh(devices)
    if check_vma:  # the wrong wrapper: JAX psums replicated-parameter gradients by itself
        fn = functools.partial(steps.train_step, config=cfg)
        from jax.sharding import PartitionSpec as P

        step = jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=(P(), P("batch"), P()),
                                     out_specs=(P(), P()), check_vma=True))
    else:
        step = parallel.shard_map_train_step(cfg, mesh)
    state = parallel.put_replicated(steps.create_state(variables, tx), mesh)
    states = []
    for b in batches[:n_steps]:
        state, _ = step(state, parallel.put_batch(b, mesh), jax.random.key(1))
        states.append(jax.tree.map(np.asarray, state))
    return states if history else states[-1]


def run_virtual_shards(n, sync_bn, n_steps=3, history=False):
    """n per-device shards on ONE device (vmap with the axis name): the reference for
    non-synchronised BatchNorm, whose statistics are per shard by definition."""
    _, variables, _, tx, batches = setup()
    cfg = config(sync_bn)
    fn = functools.partial(steps.train_step, config=cfg)
    # The state is not mapped (every shard reads the same parameters, as the devices' replicas
    # are equal); after the step's pmeans the shards' new states are equal, so keep the first.
    step = jax.jit(jax.vmap(fn, axis_name="batch", in_axes=(None, 0, None)))
    state = steps.create_state(variables, tx)
    states = []
    for b in batches[:n_steps]:
        state, _ = step(state, parallel.shard(b, n), jax.random.key(1))
        state = jax.tree.map(lambda x: x[0], state)
        states.append(jax.tree.map(np.asarray, state))
    return states if history else states[-1]


def assert_close(a, b, rtol=1e-5):
    fa, fb = traverse_util.flatten_dict(a, sep="/"), traverse_util.flatten_dict(b, sep="/")
    assert fa.keys() == fb.keys()
    for k in fa:
        x, y = np.asarray(fa[k], np.float64), np.asarray(fb[k], np.float64)
        scale = max(np.abs(y).max(), 1e-3)
        assert np.abs(x - y).max() <= rtol * scale, f"{k}: {np.abs(x - y).max()} vs {scale}"


def assert_tree_close(a, b, rtol=1e-5):
    """||a - b|| / ||b|| over all leaves together.

    For non-synchronised BatchNorm, where each of the 8 shards normalises over 2 images: there
    the float32 rounding of the matmuls (which differs between a per-device batch of 2 and the
    reference's batch of 16) is amplified in a few small tensors (up to 1.6% of one kernel's
    update after three steps, on the 1x1-as-matmul path), while the whole tree agrees to ~2e-6.
    A gradient scaled by the device count misses by a factor of order 1."""
    fa, fb = traverse_util.flatten_dict(a, sep="/"), traverse_util.flatten_dict(b, sep="/")
    assert fa.keys() == fb.keys()
    diff = sum(float(np.sum((np.asarray(fa[k], np.float64) - np.asarray(fb[k])) ** 2))
               for k in fa)
    norm = sum(float(np.sum(np.asarray(fb[k], np.float64) ** 2)) for k in fb)
    assert diff ** 0.5 <= rtol * norm ** 0.5, f"relative difference {(diff / norm) ** 0.5:.2e}"


@pytest.fixture(scope="module")
def devices():
    devs = jax.devices()
    if len(devs) < 8:
        pytest.fail("tests need 8 CPU devices: XLA_FLAGS=--xla_force_host_platform_device_count=8"
                    " (set by tests/conftest.py before JAX starts)")
    return devs[:8]


def test_sync_bn_one_device_equals_eight(devices):
    one = run_pmap(devices[:1], sync_bn=True)
    eight = run_pmap(devices, sync_bn=True)
    assert_close(eight.params, one.params)
    assert_close(eight.batch_stats, one.batch_stats)
    sm = run_shard_map(devices, sync_bn=True)
    assert_close(sm.params, one.params)
    assert_close(sm.batch_stats, one.batch_stats)


def test_unsynced_bn_one_device_equals_eight(devices):
    """After one step the runs agree to float32 rounding (~4e-9 of the tree); BatchNorm over
    per-device batches of 2 amplifies the rounding several hundred times a step (up to 1.9e-5
    after three, with the C++ direct convolution on an Intel Xeon), so the third step is held
    to 1e-4, still four orders of magnitude below a gradient scaled by the device count."""
    reference = run_virtual_shards(8, sync_bn=False, history=True)
    for run in (run_pmap, run_shard_map):
        states = run(devices, sync_bn=False, history=True)
        assert_tree_close(states[0].params, reference[0].params, rtol=1e-7)
        assert_tree_close(states[0].batch_stats, reference[0].batch_stats, rtol=1e-7)
        assert_tree_close(states[-1].params, reference[-1].params, rtol=1e-4)
        assert_tree_close(states[-1].batch_stats, reference[-1].batch_stats, rtol=1e-4)
    reference = reference[-1]
    scaled = jax.tree.map(lambda r, s: r + 8 * (r - s), reference.params,  # 8x the update
                          setup()[1]["params"])
    with pytest.raises(AssertionError, match="relative difference"):
        assert_tree_close(scaled, reference.params, rtol=1e-4)


def test_gradient_scaling_is_caught(devices):
    """A wrapper that multiplies gradients by the device count must fail the comparison."""
    one = run_pmap(devices[:1], sync_bn=True, n_steps=1)
    wrong = run_shard_map(devices, sync_bn=True, n_steps=1, check_vma=True)
    _, variables, _, _, _ = setup()
    start = variables["params"]["head"]["kernel"]
    step_one = np.asarray(one.params["head"]["kernel"]) - np.asarray(start)
    step_wrong = np.asarray(wrong.params["head"]["kernel"]) - np.asarray(start)
    ratio = np.abs(step_wrong).sum() / np.abs(step_one).sum()
    assert ratio == pytest.approx(8.0, rel=1e-3)  # what the wrong wrapper does
    with pytest.raises(AssertionError):
        assert_close(wrong.params, one.params)
    right = run_shard_map(devices, sync_bn=True, n_steps=1)
    assert_close(right.params, one.params)


def test_frozen_parameters_and_statistics_are_bit_identical(devices):
    _, variables, labels, _, _ = setup()
    end = run_pmap(devices[:2], sync_bn=False)
    trained = freeze.trainable(labels)
    start_p = traverse_util.flatten_dict(variables["params"], sep="/")
    end_p = traverse_util.flatten_dict(end.params, sep="/")
    for k, v in start_p.items():
        if k in trained:
            assert not np.array_equal(np.asarray(v), end_p[k]), f"{k} did not learn"
        else:
            assert np.array_equal(np.asarray(v), end_p[k]), f"{k} changed while frozen"
    frozen_bn = freeze.frozen_batchnorm(labels, variables["batch_stats"])
    assert frozen_bn
    start_s = traverse_util.flatten_dict(variables["batch_stats"], sep="/")
    end_s = traverse_util.flatten_dict(end.batch_stats, sep="/")
    for k, v in start_s.items():
        same = np.array_equal(np.asarray(v), end_s[k])
        assert same == (k.rsplit("/", 1)[0] in frozen_bn), k


def test_shard_map_step_passes_carried_leaves_through(devices):
    """The shard_map step returns the frozen parameters and statistics as the very arrays it was
    given (passed in, not donated, not returned) and donates the leaves that change."""
    _, variables, labels, tx, batches = setup()
    cfg = config(False)
    mesh = parallel.mesh(devices[:2])
    step = parallel.shard_map_train_step(cfg, mesh)
    state = parallel.put_replicated(steps.create_state(variables, tx), mesh)
    carried = steps.carried_paths(state, cfg)
    frozen_bn = freeze.frozen_batchnorm(labels, variables["batch_stats"])
    trained = freeze.trainable(labels)
    params = traverse_util.flatten_dict(variables["params"], sep="/")
    assert {k for k in carried if k.startswith("params/")} == {
        f"params/{k}" for k in params if k not in trained}
    assert {k.rsplit("/", 1)[0] for k in carried if k.startswith("batch_stats/")} == {
        f"batch_stats/{m}" for m in frozen_bn}
    before = {jax.tree_util.keystr(p, simple=True, separator="/"): x
              for p, x in jax.tree_util.tree_flatten_with_path(state)[0]}
    new, metrics = step(state, parallel.put_batch(batches[0], mesh), jax.random.key(1))
    jax.block_until_ready(metrics)
    after = {jax.tree_util.keystr(p, simple=True, separator="/"): x
             for p, x in jax.tree_util.tree_flatten_with_path(new)[0]}
    assert after.keys() == before.keys()
    for k, x in after.items():
        if k in carried:
            assert x is before[k] and not x.is_deleted(), k
        else:
            assert x is not before[k] and before[k].is_deleted(), f"{k} was not donated"
    # A second step takes the returned state as it is.
    new, _ = step(new, parallel.put_batch(batches[1], mesh), jax.random.key(1))
    assert int(new.step) == 2


def test_carried_leaf_that_changes_is_an_error(devices, monkeypatch):
    """If `carried_paths` named a leaf that the step changes (here the trained head), the
    step would drop its update: tracing the step stops with an error instead."""
    _, variables, _, tx, batches = setup()
    cfg = config(False)
    right = steps.carried_paths
    monkeypatch.setattr(steps, "carried_paths",
                        lambda s, c: right(s, c) | {"params/head/kernel"})
    mesh = parallel.mesh(devices[:1])
    state = parallel.put_replicated(steps.create_state(variables, tx), mesh)
    with pytest.raises(parallel.CarriedLeafError,
                       match="changed params/head/kernel, which train_step.carried_paths"):
        parallel.shard_map_train_step(cfg, mesh)(state, parallel.put_batch(batches[0], mesh),
                                                 jax.random.key(1))


def test_frozen_batchnorm_in_training_mode_equals_inference(devices):
    model, variables, labels, _, batches = setup()
    frozen = freeze.frozen_batchnorm(freeze.resolve(variables["params"], "backbone"),
                                     variables["batch_stats"])
    x = batches[0]["image"]
    infer = jax.jit(model.apply)(variables, x)
    train, updated = jax.jit(lambda v, x: model.apply(
        v, x, train=TrainMode(frozen_bn=frozen), mutable=["batch_stats"]))(variables, x)
    np.testing.assert_array_equal(np.asarray(train), np.asarray(infer))
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 updated["batch_stats"], variables["batch_stats"])
    # Without the freeze, training-mode BatchNorm uses batch statistics: different outputs.
    trained = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"])[0])
    assert not np.allclose(np.asarray(trained(variables, x)), np.asarray(infer))


@pytest.mark.parametrize("form", ["pmap", "shard_map"])
def test_second_step_compiles_nothing(devices, form):
    """The state a step returns is laid out like the state it was given, so feeding it back
    reuses the compiled step (a replicated state under another mesh axis name than pmap's
    made the second call trace and compile the whole step again)."""
    _, variables, _, tx, batches = setup()
    step, put_state, put_batch = parallel.compile_train_step(config(False), form, devices[:2])
    state = put_state(steps.create_state(variables, tx))
    state, _ = step(state, put_batch(batches[0]), jax.random.key(1))
    compiles = []

    def listen(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(duration)

    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        state, metrics = step(state, put_batch(batches[1]), jax.random.key(1))
        jax.block_until_ready(metrics)
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)
    assert compiles == [], f"the second step compiled {len(compiles)} program(s)"


def test_global_batch_not_divisible_by_devices():
    with pytest.raises(parallel.BatchSizeError, match="does not divide over 8 devices; use a "
                                                       r"multiple of 8 \(e.g. 8 or 16\)"):
        parallel.shard({"image": np.zeros((12, 4)), "label": np.zeros(12)}, 8)


def test_two_processes_of_four_devices_equal_one_process_of_eight(devices, tmp_path):
    """Two processes x 4 CPU devices (jax.distributed on 127.0.0.1, gloo collectives), each
    feeding its own half of every global batch, end with the parameters of 1 process x 8, with
    pmap and with shard_map."""
    import os
    import subprocess
    import sys

    worker = os.path.join(os.path.dirname(__file__), "multiprocess_worker.py")
    port, out = str(free_port()), str(tmp_path / "params.npz")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    procs = [subprocess.Popen([sys.executable, worker, str(i), "2", port, out], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    finish(procs, timeout=400)
    expected = run_pmap(devices, sync_bn=True).params
    for form in ("pmap", "shard_map"):
        got = dict(np.load(out.replace(".npz", f"_{form}.npz")))
        assert_close(traverse_util.unflatten_dict(got, sep="/"), expected)


def test_dropout_masks_do_not_depend_on_the_device_count(devices):
    """`layers.Dropout` (element-wise, and per example as stochastic depth) under shard_map
    on 8 devices draws for each example the mask it draws on 1: the layer's key folded with
    the example's row in the global batch."""
    import jax.numpy as jnp
    from jax.sharding import PartitionSpec as P

    from tljax.models import layers

    class Net(layers.nn.Module):
        @layers.nn.compact
        def __call__(self, x, train):
            x = layers.Dropout(0.5, broadcast_dims=(1, 2, 3))(x, train)
            return layers.Dropout(0.3)(x, train)

    x = jnp.ones((16, 4, 4, 3))
    mode = TrainMode(batch_axis="batch")
    key = jax.random.key(3)

    def on(mesh_devices):
        fn = jax.shard_map(lambda v: Net().apply({}, v, mode, rngs={"dropout": key}),
                           mesh=parallel.mesh(mesh_devices), in_specs=P("batch"),
                           out_specs=P("batch"))
        return np.asarray(jax.jit(fn)(x))

    one, eight = on(devices[:1]), on(devices)
    np.testing.assert_array_equal(one, eight)
    dropped = (one == 0).reshape(16, -1)
    assert 0 < dropped.all(1).sum() < 16  # whole examples dropped, not all
    assert 0.2 < dropped.mean() < 0.8
    assert np.array_equal(Net().apply({}, x, False), x)  # inference: the identity


def test_process_rows_of_a_mesh(devices):
    """One process holds every row; the rows are those `put_batch` lays out on its devices."""
    assert parallel.process_rows(parallel.mesh(devices), 16) == (0, 16)
    assert parallel.process_rows(parallel.mesh(devices[:2]), 4) == (0, 4)


@pytest.mark.parametrize("warmup", [True, False])
def test_moving_average_of_the_parameters_against_a_hand_computation(warmup):
    """`ema_params` after each step is d_t * before + (1 - d_t) * the new parameters, d_t =
    min(d, (1 + t) / (10 + t)) with warmup (else d), for the trained parameters and those in
    `ema_paths` (one frozen here, as after a phase that trained it: its average, started at
    zero, moves toward its value); the others' averages stay equal to them, bit for bit."""
    import dataclasses

    _, variables, _, tx, batches = setup()
    decay = 0.9
    base = config(False)
    refrozen = next(k for k in traverse_util.flatten_dict(variables["params"], sep="/")
                    if k not in base.trainable and k.endswith("kernel"))
    cfg = dataclasses.replace(base, ema_decay=decay, ema_warmup=warmup,
                              ema_paths=base.trainable | {refrozen})
    mesh = parallel.mesh(jax.devices()[:2])
    step = parallel.shard_map_train_step(cfg, mesh)
    state = steps.create_state(variables, tx, ema=True)
    ema0 = traverse_util.flatten_dict(state.ema_params, sep="/")
    ema0[refrozen] = np.zeros_like(ema0[refrozen])
    state = parallel.put_replicated(
        state.replace(ema_params=traverse_util.unflatten_dict(ema0, sep="/")), mesh)

    def flat(tree):
        return traverse_util.flatten_dict(jax.tree.map(np.asarray, tree), sep="/")

    start = flat(variables["params"])
    expected = dict(ema0)
    for t, b in enumerate(batches):
        state, _ = step(state, parallel.put_batch(b, mesh), jax.random.key(1))
        params, ema = flat(state.params), flat(state.ema_params)
        d = np.float32(min(decay, (1 + t) / (10 + t)) if warmup else decay)
        expected = {k: d * expected[k] + (1 - d) * params[k] for k in params}
        for k in params:
            if k in cfg.averaged:
                np.testing.assert_allclose(ema[k], expected[k], rtol=1e-5, atol=1e-7,
                                           err_msg=k)
            else:
                assert np.array_equal(ema[k], params[k]) and np.array_equal(ema[k], start[k]), k
    assert np.array_equal(params[refrozen], start[refrozen])  # frozen, yet averaged toward
    assert not np.allclose(ema[refrozen], 0.0) and not np.allclose(ema[refrozen], start[refrozen])
    moved = [k for k in cfg.trainable if not np.allclose(ema[k], params[k])]
    assert moved and "head/kernel" in moved  # an average, not a copy of the parameters
