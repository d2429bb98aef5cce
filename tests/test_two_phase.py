"""The two-phase recipe in the training program (`config.finetune`): the head on cached
features, then the top of the network with BatchNorm on its moving statistics; resumable at
the phase boundary and inside the second phase, bitwise."""

from __future__ import annotations

import os
import shutil

import jax
import numpy as np
import pytest
from flax import traverse_util
from test_train import checkpoints, final_params, tiny_config

from tljax import checkpoint

HEAD, FINETUNE = 6, 6
TOTAL = HEAD + FINETUNE
pytestmark = pytest.mark.xdist_group("two_phase")  # one worker builds the shared run


def two_phase_config(data_dir, steps=HEAD, **overrides):
    return tiny_config(data_dir, steps=steps, freeze="backbone", checkpoint_every=2,
                       keep_checkpoints=20, **{"finetune.steps": FINETUNE,
                                               "finetune.freeze": "top:1", **overrides})


@pytest.fixture(scope="module")
def two_phase_run(data_dir, tmp_path_factory):
    from tljax import run, train

    config = two_phase_config(data_dir)
    plan = run.phases(config)
    assert [(p.name, p.start, p.end, p.cached, p.bn_inference) for p in plan] == [
        ("head", 0, HEAD, True, False), ("finetune", HEAD, TOTAL, False, True)]
    workdir = str(tmp_path_factory.mktemp("two_phase"))
    summary = train.train_and_evaluate(config, workdir)
    r = run.resolve(config)
    start = run.initial_variables(r, run.build_model(r))
    start = traverse_util.flatten_dict(start, sep="/")
    return workdir, summary, start


def changed(a: dict, b: dict) -> set[str]:
    return {k for k in a if not np.array_equal(a[k], b[k])}


def test_each_phase_trains_its_own_parameters(two_phase_run):
    workdir, summary, start = two_phase_run
    assert summary["steps"] == TOTAL
    assert [summary["phases"][p]["end_step"] for p in ("head", "finetune")] == [HEAD, TOTAL]
    after_head, after_all = final_params(workdir, HEAD), final_params(workdir, TOTAL)
    assert changed(start, after_head) == {"params/head/kernel", "params/head/bias"}
    second = changed(after_head, after_all)
    assert {"params/head/kernel", "params/head/bias"} <= second
    assert any(k.startswith("params/stage4/") for k in second)
    assert not any(k.startswith(("params/stem/", "params/stage1/")) for k in second)
    # batchnorm='inference': no statistics move, in either phase.
    assert not any(k.startswith("batch_stats/") for k in changed(start, after_all))


@pytest.mark.parametrize("resume_at", [HEAD, HEAD + 2], ids=["boundary", "second_phase"])
def test_resumes_in_either_phase_to_the_same_parameters(two_phase_run, data_dir, tmp_path,
                                                        resume_at):
    """A run killed after `resume_at` (its later checkpoints gone) ends bitwise equal."""
    from tljax import train

    reference, _, _ = two_phase_run
    workdir = str(tmp_path / "resumed")
    shutil.copytree(reference, workdir)
    ckpts = os.path.join(workdir, "checkpoints")
    for name in os.listdir(ckpts):
        if name.isdigit() and int(name) > resume_at:
            shutil.rmtree(os.path.join(ckpts, name))
    train.train_and_evaluate(two_phase_config(data_dir), workdir)
    a, b = (checkpoint.restore_numpy(os.path.join(w, "checkpoints", str(TOTAL)))
            for w in (reference, workdir))
    a, b = ({jax.tree_util.keystr(k): np.asarray(v)
             for k, v in jax.tree_util.tree_flatten_with_path(t)[0]} for t in (a, b))
    assert a.keys() == b.keys() and any(k.startswith("['opt_state']") for k in a)
    for k in a:  # parameters, statistics, optimizer state and step
        assert np.array_equal(a[k], b[k]), k


@pytest.mark.parametrize("overrides, message", [
    ({"steps": HEAD - 2}, r"would change \(steps: 6 -> 4\)"),
    ({"finetune.steps": 2}, r"would change \(finetune.steps: 6 -> 2\)"),
])
def test_a_changed_plan_is_refused_before_anything_is_written(two_phase_run, data_dir, tmp_path,
                                                              overrides, message):
    from tljax import run, train

    reference, _, _ = two_phase_run
    workdir = str(tmp_path / "changed")
    shutil.copytree(reference, workdir)
    with open(os.path.join(workdir, "config.json")) as f:
        before = f.read()
    with pytest.raises(run.RunError, match=message):
        train.train_and_evaluate(two_phase_config(data_dir, **overrides), workdir)
    with open(os.path.join(workdir, "config.json")) as f:
        assert f.read() == before


def test_evaluate_restores_checkpoints_of_both_phases(two_phase_run):
    from tljax import evaluate, metrics

    workdir, _, _ = two_phase_run
    logged = {m["step"]: m["eval/top1"] for m in metrics.read(workdir) if "eval/top1" in m}
    for step in (HEAD, TOTAL):
        result = evaluate.evaluate(workdir, str(step))
        assert result["top1"] == pytest.approx(logged[step], abs=1e-6)


def test_carrying_the_optimizer_state_continues_its_schedule(data_dir, tmp_path):
    """'carry' with the same groups and optimizer: the second phase's schedule counts its own
    steps although the optimizer's count goes on."""
    from tljax import freeze, metrics, run, train

    config = two_phase_config(data_dir, **{"finetune.optimizer_state": "carry",
                                           "finetune.freeze": "backbone",
                                           "finetune.optimizer": ""})
    workdir = str(tmp_path / "carry_ok")
    train.train_and_evaluate(config, workdir)
    second = run.phases(config)[1]
    r = run.resolve(config)
    params = run.initial_variables(r, run.build_model(r))["params"]
    _, schedule = run.optimizer(second, freeze.resolve(params, "backbone"))
    logged = {m["step"]: m["learning_rate"] for m in metrics.read(workdir)
              if "learning_rate" in m}
    step = HEAD + 2  # the first record of the second phase (log_every=2): its step 2 of 6
    assert logged[step] == pytest.approx(float(schedule(step - 1 - HEAD)))
    assert logged[step] != pytest.approx(float(schedule(step - 1)))
    tree = checkpoint.restore_numpy(os.path.join(workdir, "checkpoints", str(TOTAL)))
    counts = [int(v) for k, v in jax.tree_util.tree_flatten_with_path(tree["opt_state"])[0]
              if jax.tree_util.keystr(k).endswith("['count']")]
    assert counts and set(counts) == {TOTAL}  # carried: one count over both phases


def test_recipe_two_phase_with_a_probe_second_phase_is_refused():
    from processes import config_module

    from tljax import config_args

    with pytest.raises(config_args.ConfigError, match="freeze=none, top:N"):
        config_module().get_config("recipe=two_phase,freeze=backbone")


def test_carrying_the_optimizer_state_into_other_groups_is_refused(data_dir, tmp_path):
    from tljax import run, train

    config = two_phase_config(data_dir, **{"finetune.optimizer_state": "carry"})
    with pytest.raises(run.RunError, match="same parameters.*'backbone'.*'top:1'.*'reset'"):
        train.train_and_evaluate(config, str(tmp_path / "carry"))
    assert not checkpoints(str(tmp_path / "carry"))  # refused before any step


@pytest.mark.parametrize("field, value, message", [
    ("finetune.batchnorm", "frozen", "'inference'.*'train'"),
    ("finetune.freeze", "top2", "presets are"),
    ("finetune.optimizer", "lamb", "'sgd', 'adam' or 'adamw'"),
])
def test_second_phase_typos_are_named(data_dir, field, value, message):
    from tljax import freeze, run

    with pytest.raises((run.RunError, freeze.FreezeError), match=f"config.{field}=.*{message}"):
        run.resolve(two_phase_config(data_dir, **{field: value}))
