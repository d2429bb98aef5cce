"""Fine-tuning schedules: phases keep parameters and statistics and handle optimizer state
explicitly; a phase that does not fit the model is refused before training starts."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import traverse_util
from tiny_training import setup

from tljax import freeze, parallel, phases
from tljax import train_step as steps
from tljax.models import resnet


def run_phase(phase, labels, state, model, batches):
    state, config = phases.begin(phase, labels, state, model)
    step = jax.jit(jax.vmap(lambda s, b, k: steps.train_step(s, b, k, config),
                            axis_name="batch", in_axes=(0, 0, None)))
    batched = jax.tree.map(lambda x: x[None], state)
    for b in batches[: phase.steps]:
        batched, _ = step(batched, parallel.shard(b, 1), jax.random.key(0))
    return jax.tree.map(lambda x: np.asarray(x[0]), batched)


def test_classic_two_phase_recipe():
    model, variables, _, _, batches = setup()
    schedule = phases.classic(head_steps=2, finetune_steps=1, head_lr=0.05, finetune_lr=0.01,
                              top_blocks=1)
    labels = phases.resolve(schedule, variables["params"], resnet.FAMILY)
    state = steps.create_state(variables, schedule[0].optimizer(0.0))
    after_head = run_phase(schedule[0], labels[0], state, model, batches)
    p0 = traverse_util.flatten_dict(variables["params"], sep="/")
    p1 = traverse_util.flatten_dict(after_head.params, sep="/")
    assert {k for k in p0 if not np.array_equal(p0[k], p1[k])} == {"head/bias", "head/kernel"}

    after_ft = run_phase(schedule[1], labels[1], after_head, model, batches)
    p2 = traverse_util.flatten_dict(after_ft.params, sep="/")
    changed = {k for k in p1 if not np.array_equal(p1[k], p2[k])}
    assert changed == set(freeze.trainable(labels[1]))
    assert any(k.startswith("stage4/") for k in changed)
    assert not any(k.startswith(("stem/", "stage1/", "stage3/")) for k in changed)
    assert int(after_ft.step) == 3  # the global step continues across phases


def test_phase_naming_a_stage_the_model_lacks_is_refused():
    _, variables, _, _, _ = setup()
    schedule = [phases.Phase(5, "backbone", 0.1, name="head"),
                phases.Phase(5, "up_to:stage7", 0.01, name="finetune")]
    with pytest.raises(phases.PhaseError, match=r"phase 1 \('finetune'\): .*no unit 'stage7'.*"
                                                r"stem, stage1, stage2, stage3, stage4"):
        phases.resolve(schedule, variables["params"], resnet.FAMILY)


def test_carrying_optimizer_state_needs_the_same_groups():
    _, variables, _, _, _ = setup()
    schedule = [phases.Phase(5, "backbone", 0.1),
                phases.Phase(5, "top:1", 0.01, optimizer_state="carry")]
    with pytest.raises(phases.PhaseError, match="same freeze groups.*'reset'"):
        phases.resolve(schedule, variables["params"], resnet.FAMILY)
    same = [phases.Phase(5, "top:1", 0.1), phases.Phase(5, "top:1", 0.01,
                                                         optimizer_state="carry")]
    assert len(phases.resolve(same, variables["params"], resnet.FAMILY)) == 2


def test_bfloat16_step_keeps_float32_parameters_statistics_and_loss():
    import jax.numpy as jnp
    from tiny_training import tiny_model

    model = tiny_model().clone(dtype=jnp.bfloat16)
    _, variables, labels, tx, batches = setup()
    config = steps.StepConfig(model=model, tx=tx, trainable=freeze.trainable(labels),
                              frozen_bn=freeze.frozen_batchnorm(labels, variables["batch_stats"]))
    step = jax.jit(jax.vmap(lambda s, b, k: steps.train_step(s, b, k, config),
                            axis_name="batch", in_axes=(0, 0, None)))
    state = jax.tree.map(lambda x: np.asarray(x)[None], steps.create_state(variables, tx))
    state, metrics = step(state, parallel.shard(batches[0], 1), jax.random.key(0))
    assert metrics["loss"].dtype == jnp.float32 and np.isfinite(float(metrics["loss"][0]))
    leaves = jax.tree_util.tree_leaves((state.params, state.batch_stats))
    assert all(x.dtype == jnp.float32 for x in leaves)
    head = np.asarray(state.params["head"]["kernel"][0])
    assert not np.array_equal(head, variables["params"]["head"]["kernel"])
