"""The training program end to end on a tiny model (`test_resnet`, 32x32, `digits`): what it
writes, kill-and-resume equality, SIGTERM, restoring on another device count, and its errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from processes import CONFIG, ROOT, config_module, finish, free_port

STEPS = 12
# One xdist worker runs this module, so that the reference run and the prepared data are shared.
pytestmark = pytest.mark.xdist_group("train_program")


def tiny_args(data_dir: str, steps: int = STEPS, extra: str = "") -> list[str]:
    return [f"--config={CONFIG}:model=test_resnet,init=scratch,steps={steps},batch_size=16"
            + extra,
            "--config.image_size=32", "--config.eval_every=6", "--config.log_every=2",
            "--config.checkpoint_every=4", "--config.keep_checkpoints=2",
            "--config.dropout_rate=0.3", "--config.augment.flip=true",
            "--config.ema_decay=0.9", f"--config.data_dir={data_dir}"]


def tiny_config(data_dir: str, steps: int = STEPS, **overrides):
    c = config_module().get_config(f"model=test_resnet,init=scratch,steps={steps},batch_size=16")
    c.image_size, c.eval_every, c.log_every = 32, 6, 2
    c.checkpoint_every, c.keep_checkpoints, c.data_dir = 4, 2, data_dir
    # Dropout before the head and flips on the device: the random streams a resume must keep;
    # a moving average of the parameters, which the run selects on.
    c.dropout_rate, c.augment.flip, c.ema_decay = 0.3, True, 0.9
    for k, v in overrides.items():
        node = c
        *parents, last = k.split(".")
        for p in parents:
            node = node[p]
        node[last] = v
    return c


def run_cli(args: list[str], env_extra: dict | None = None, wait: bool = True,
            module: str = "tljax.train"):
    env = dict(os.environ, **(env_extra or {}))
    cmd = [sys.executable, "-m", module, *args]
    if not wait:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def final_params(workdir: str, step: int = STEPS) -> dict:
    from flax import traverse_util

    from tljax import checkpoint

    tree = checkpoint.restore_numpy(os.path.join(workdir, "checkpoints", str(step)))
    return traverse_util.flatten_dict({k: tree[k] for k in ("params", "batch_stats",
                                                            "ema_params") if tree.get(k)},
                                      sep="/")


def wait_for(predicate, proc, timeout=300, what=""):
    t = time.time()
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (status {proc.returncode}) before {what}:\n"
                                 + proc.stdout.read()[-3000:])
        if time.time() - t > timeout:
            proc.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def checkpoints(workdir: str) -> list[int]:
    d = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(d):
        return []
    return sorted(int(s) for s in os.listdir(d) if s.isdigit())


def logged_steps(workdir: str) -> list[int]:
    from tljax import metrics

    return [r["step"] for r in metrics.read(workdir) if "train/loss" in r]


def kill_after_first_checkpoint(procs, workdir: str, listing=checkpoints,
                                logged: int = 0) -> list[int]:
    """SIGKILL every process of a run once `listing(workdir)` shows a checkpoint and step
    `logged` is in its metrics; the checkpoints then there (the run had not finished)."""
    try:
        wait_for(lambda: listing(workdir) and max(logged_steps(workdir) or [0]) >= logged,
                 procs[0], what="the first checkpoint")
    finally:
        for p in procs:  # never leave one behind, whatever happened
            p.send_signal(signal.SIGKILL)
            p.wait()
    first = listing(workdir)
    assert first and max(first) < STEPS
    return first


OPENED = []  # (split, the last step logged when the reference run opened it)


@pytest.fixture(scope="module")
def reference_run(data_dir, tmp_path_factory):
    """An uninterrupted run, in this process (8 CPU devices)."""
    from tljax import train
    from tljax.datasets import sources

    workdir = str(tmp_path_factory.mktemp("reference"))
    real = sources.Source.records

    def records(self, split, budget):
        OPENED.append((split, max(logged_steps(workdir) or [0])))
        return real(self, split, budget)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sources.Source, "records", records)
        summary = train.train_and_evaluate(tiny_config(data_dir), workdir)
    return workdir, summary


def test_selection_on_validation_and_the_test_split_once_at_the_end(reference_run):
    """Evaluations during the run (and the best checkpoint, here by the moving average of the
    parameters) use the validation split held out of train; the test split is read only after
    the last step, for the final and the selected checkpoints."""
    from tljax import metrics

    workdir, summary = reference_run
    splits = {s for s, _ in OPENED}
    assert splits == {"train[:90%]", "train[90%:]", "test"}, OPENED
    assert [step for s, step in OPENED if s == "test"] and all(
        step == STEPS for s, step in OPENED if s == "test"), OPENED
    assert summary["selection_split"] == "train[90%:]" and summary["test_split"] == "test"
    logged = {r["step"]: r for r in metrics.read(workdir) if "eval/top1" in r}
    best = max(logged, key=lambda s: (logged[s]["eval_ema/top1"], -s))
    assert summary["params"] == "ema"
    assert summary["best_step"] == summary["selected"]["step"] == best
    assert summary["selected"]["validation"]["top1"] == logged[best]["eval_ema/top1"]
    assert summary["final"]["validation"]["top1"] == logged[STEPS]["eval_ema/top1"]
    assert summary["final"]["raw"]["validation"]["top1"] == logged[STEPS]["eval/top1"]
    from tljax import train

    line = train.describe(summary)
    assert "figures of the moving average of the parameters" in line
    assert f"(parameters: validation top-1 {logged[STEPS]['eval/top1']:.4f}, test" in line
    for which in ("final", "selected"):
        assert 0.0 <= summary[which]["test"]["top1"] <= 1.0
    with open(os.path.join(workdir, "summary.json")) as f:
        assert json.load(f)["final"]["test"] == summary["final"]["test"]


def test_a_run_writes_checkpoints_metrics_events_and_plot(reference_run):
    from tljax import metrics

    workdir, summary = reference_run
    assert summary["steps"] == STEPS and 0.0 <= summary["top1"] <= 1.0
    # Checkpoints every 4 steps and at each evaluation (6, 12); the last 2 plus the best kept.
    kept = checkpoints(workdir)
    assert kept[-2:] == [8, 12] and len(kept) <= 3
    assert summary["best_step"] in kept
    records = metrics.read(workdir)
    train_records = [r for r in records if "train/loss" in r]
    eval_records = [r for r in records if "eval/top1" in r]
    assert [r["step"] for r in train_records] == list(range(2, STEPS + 1, 2))
    assert [r["step"] for r in eval_records] == [6, 12]
    assert set(train_records[0]) == {"step", "train/loss", "train/accuracy", "learning_rate",
                                     "images_per_second", "input_wait"}
    assert all(0.0 <= r["input_wait"] <= 1.0 for r in train_records)
    assert set(eval_records[0]) == {"step", "eval/loss", "eval/top1", "eval/top5",
                                    "eval_ema/loss", "eval_ema/top1", "eval_ema/top5"}
    assert eval_records[-1]["eval_ema/top1"] == pytest.approx(summary["top1"])
    events = os.listdir(os.path.join(workdir, "tensorboard"))
    assert any(e.startswith("events.out.tfevents") for e in events)
    with open(summary["plot"], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with open(os.path.join(workdir, "config.json")) as f:
        config = json.load(f)
    assert config["num_classes"] == 10 and config["train_split"] == "train[:90%]"
    assert config["validation_split"] == "train[90%:]" and config["test_split"] == "test"
    with open(os.path.join(workdir, "run.json")) as f:
        run = json.load(f)
    assert run["devices"] == 8 and "jax" in run["versions"]


def test_killed_and_preempted_run_resumes_to_the_same_parameters(reference_run, data_dir,
                                                                  tmp_path):
    """SIGKILL after the first checkpoint, then SIGTERM after the restart has made progress,
    then the same command to the end: bitwise equal to the uninterrupted run."""
    reference, _ = reference_run
    workdir = str(tmp_path / "interrupted")
    args = tiny_args(data_dir) + [f"--workdir={workdir}"]

    first = kill_after_first_checkpoint([run_cli(args, wait=False)], workdir, logged=5)

    proc = run_cli(args, wait=False)
    # The restarted run first drops the records after its checkpoint, then logs anew.
    wait_for(lambda: max(logged_steps(workdir) or [0]) <= max(first), proc,
             what="the restart to take over metrics.jsonl")
    wait_for(lambda: max(logged_steps(workdir) or [0]) > max(first), proc,
             what="progress after the restart")
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    if proc.returncode == 0:  # it finished before the signal arrived: nothing to check here
        pytest.skip("the run finished before SIGTERM arrived")
    assert proc.returncode == 143, out[-3000:]
    stopped = max(checkpoints(workdir))
    assert max(first) < stopped <= STEPS
    assert "SIGTERM" in out and "resume" in out

    done = run_cli(args)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"resuming from {os.path.join(workdir, 'checkpoints')}/{stopped}" in done.stderr
    a, b = final_params(reference), final_params(workdir)
    assert a.keys() == b.keys()
    for k in a:
        assert np.array_equal(a[k], b[k]), k
    # The metrics file reads as one run: each step logged once.
    steps = logged_steps(workdir)
    assert steps == sorted(set(steps)) and steps[-1] == STEPS


def test_evaluate_restores_a_run_from_8_devices_onto_1(reference_run):
    workdir, summary = reference_run
    out = run_cli(["--workdir", workdir, "--checkpoint", "latest", "--split", "test",
                   "--json"], env_extra={"XLA_FLAGS": "--xla_force_host_platform_device_count=1"},
                  module="tljax.evaluate")
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["step"] == STEPS and result["examples"] == 360
    assert result["top1"] == pytest.approx(summary["final"]["test"]["top1"], abs=1e-6)


def test_the_moving_average_is_checkpointed_and_evaluates_as_logged(reference_run):
    """Each checkpoint holds the moving average beside the parameters; `tljax.evaluate`
    gives what the run logged for each (`--params raw|ema`, by default the selected kind), and
    the summary's test figures of the raw parameters are tljax.evaluate's."""
    from tljax import metrics
    from tljax.evaluate import evaluate_many

    workdir, summary = reference_run
    tree = final_params(workdir)
    ema = {k for k in tree if k.startswith("ema_params/")}
    assert ema == {"ema_" + k for k in tree if k.startswith("params/")}
    assert any(not np.array_equal(tree[k], tree[k[4:]]) for k in ema)
    logged = {r["step"]: r for r in metrics.read(workdir) if "eval/top1" in r}
    got = evaluate_many(workdir, [("best", "raw"), ("best", "ema"), ("latest", ""),
                                  ("latest", "raw")])
    for result, prefix in zip(got[:3], ("eval/", "eval_ema/", "eval_ema/"), strict=True):
        assert result["top1"] == pytest.approx(logged[result["step"]][prefix + "top1"],
                                               abs=1e-6)
        assert result["loss"] == pytest.approx(logged[result["step"]][prefix + "loss"],
                                               rel=1e-5)
    assert [r["params"] for r in got] == ["raw", "ema", "ema", "raw"]
    test = evaluate_many(workdir, [("latest", "raw")], "test")[0]
    assert test["top1"] == pytest.approx(summary["final"]["raw"]["test"]["top1"], abs=1e-6)


def test_resuming_with_another_number_of_classes_is_refused(reference_run, data_dir):
    from tljax import run, train

    workdir, _ = reference_run
    with pytest.raises(run.RunError, match=r"num_classes: 10 -> 12.*new --workdir"):
        train.train_and_evaluate(tiny_config(data_dir, num_classes=12), workdir)


def test_linear_probe_trains_on_cached_features(data_dir, tmp_path):
    from tljax import run, train

    config = tiny_config(data_dir, steps=6, freeze="backbone", ema_decay=None, **{
        "augment.crop_area": (), "augment.flip": False, "eval_every": 6})
    assert run.phases(config)[0].cached
    workdir = str(tmp_path / "probe")
    start = run.initial_variables(run.resolve(config), run.build_model(run.resolve(config)))
    summary = train.train_and_evaluate(config, workdir)
    end = final_params(workdir, 6)
    for k, v in end.items():
        before = start["params" if k.startswith("params/") else "batch_stats"]
        from flax import traverse_util

        old = traverse_util.flatten_dict(before, sep="/")[k.split("/", 1)[1]]
        if k.startswith("params/head/"):
            assert not np.array_equal(old, v), k
        else:
            assert np.array_equal(old, v), k
    # (How well a probe learns is tests/test_probe.py's, on real weights: the features of this
    # random backbone are too large for a meaningful accuracy in 6 steps.)
    assert np.isfinite(summary["final"]["validation"]["loss"])
    assert summary["params"] == "raw" and "raw" not in summary["final"]
    from tljax import evaluate

    with pytest.raises(run.RunError, match="kept no moving average.*--params raw"):
        evaluate.evaluate(workdir, params="ema")


def test_folder_dataset_names_the_corrupt_image(tmp_path):
    from PIL import Image
    from sklearn.datasets import load_digits

    from tljax import datasets

    digits = load_digits()
    root = tmp_path / "images"
    for label in (0, 1):
        (root / str(label)).mkdir(parents=True)
        for i in np.flatnonzero(digits.target == label)[:12]:
            img = (digits.images[i] * 255 / 16).astype(np.uint8)
            Image.fromarray(img).convert("RGB").save(root / str(label) / f"{i}.png")
    bad = root / "1" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    src = datasets.source(f"folder:{root}", holdout_fraction=0.04)
    assert src.class_names == ["0", "1"] and src.splits == {"train": 24, "validation": 1}
    for budget in (0.0, 1.0):  # read from the files, and held in memory
        recs = {s: src.records(s, datasets.budget(budget)) for s in src.splits}
        split = next(s for s, r in recs.items()
                     if any(r.name(i).endswith("broken.jpg") for i in range(r.n)))
        if split == "train":
            batches = datasets.train_batches(recs[split], 4, 4, 32, 0, datasets.Augment())
        else:
            batches = datasets.eval_batches(recs[split], 4, 32)[0]
        with pytest.raises(datasets.DataError, match=r"broken\.jpg.*Remove or replace"):
            for _ in range(10):
                next(batches)


def test_config_typos_are_errors_that_list_the_valid_names(tmp_path):
    from tljax.config_args import ConfigError

    with pytest.raises(ConfigError, match=r"'modle': did you mean 'model'\? valid keys"):
        config_module().get_config("modle=resnet50")
    out = run_cli([f"--config={CONFIG}", "--config.optimizer.learing_rate=0.1",
                   f"--workdir={tmp_path}"])
    assert out.returncode != 0
    assert "learing_rate" in out.stderr and "learning_rate" in out.stderr


def test_unknown_dataset_and_model_are_named():
    from tljax import datasets
    from tljax.models import registry

    with pytest.raises(datasets.DataError, match=r"unknown dataset 'tf_flower': did you mean "
                                                 r"'tf_flowers'"):
        datasets.source("tf_flower")
    with pytest.raises(ValueError, match="did you mean 'resnet50'"):
        registry.spec("resnet_50")


def test_help_explains_multi_host_runs():
    out = run_cli(["--help"])
    assert out.returncode == 0
    text = out.stdout + out.stderr
    for needle in ("jax.distributed.initialize", "--distributed", "coordinator_address",
                   "one process per host"):
        assert needle in text, needle


@pytest.mark.parametrize("field, value", [("model", "vgg19"), ("image_size", 160),
                                          ("steps", 5), ("optimizer.learning_rate", 0.5),
                                          ("freeze", "top:1"), ("seed", 1)])
def test_check_workdir_refuses_what_changes_the_run(tmp_path, field, value):
    from tljax import run

    record = {"model": "resnet50", "num_classes": 10, "image_size": 224, "dtype": "float32",
              "steps": 10, "freeze": "top:2", "seed": 0, "log_every": 10,
              "optimizer": {"learning_rate": 0.1}}
    with open(tmp_path / "config.json", "w") as f:
        json.dump(record, f)
    parent, _, leaf = field.rpartition(".")
    changed = json.loads(json.dumps(record))
    (changed[parent] if parent else changed)[leaf] = value
    with pytest.raises(run.RunError, match=rf"{field}: .* -> {value!r}.*new --workdir"):
        run.check_workdir(str(tmp_path), changed)
    assert run.check_workdir(str(tmp_path), dict(record, log_every=5)) == {"log_every": [10, 5]}
    # A field the workdir does not record (an earlier tljax) may change the numbers too.
    with pytest.raises(run.RunError, match=r"label_smoothing: None -> 0.1"):
        run.check_workdir(str(tmp_path), dict(record, label_smoothing=0.1))
    # Fields added since, which an older workdir ran without: their values then are implied.
    assert run.check_workdir(str(tmp_path), dict(record, ema_decay=None, ema_warmup=True,
                                                 select_on="raw")) == {}
    with pytest.raises(run.RunError, match=r"ema_decay: None -> 0.99"):
        run.check_workdir(str(tmp_path), dict(record, ema_decay=0.99, select_on="ema"))
    with open(tmp_path / "config.json", "w") as f:
        json.dump(dict(record, eval_split="test"), f)
    with pytest.raises(run.RunError, match="earlier tljax.*selected checkpoints on its eval"):
        run.check_workdir(str(tmp_path), record)


def test_a_refused_resume_leaves_a_workdir_that_evaluates(reference_run, data_dir, tmp_path):
    """A changed freeze is refused before any file is written (not deep in Orbax), the workdir
    still evaluates; a resume that changes only log_every is accepted and recorded."""
    import shutil

    from tljax import run, train

    reference, summary = reference_run
    workdir = str(tmp_path / "copy")
    shutil.copytree(reference, workdir)
    files = {f: open(os.path.join(workdir, f)).read() for f in ("config.json", "run.json")}
    with pytest.raises(run.RunError, match=r"freeze: 'none' -> 'top:1'.*config.init="):
        train.train_and_evaluate(tiny_config(data_dir, freeze="top:1"), workdir)
    for f, text in files.items():
        assert open(os.path.join(workdir, f)).read() == text
    out = run_cli(["--workdir", workdir, "--checkpoint", "latest", "--json"],
                  module="tljax.evaluate")
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.strip().splitlines()[-1])["top1"] == pytest.approx(
        summary["top1"], abs=1e-6)

    # Resumed when finished, with the selected checkpoint made an earlier one (8, which the
    # kept ones include): its test figures are those tljax.evaluate gives.
    from tljax import checkpoint

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(checkpoint.Checkpoints, "best_step", lambda self: 8)
        again = train.train_and_evaluate(tiny_config(data_dir, log_every=3), workdir)
    with open(os.path.join(workdir, "run.json")) as f:
        record = json.load(f)
    assert record["changed"] == {"log_every": [2, 3]} and len(record["history"]) == 1
    assert again["selected"]["step"] == 8 and "validation" not in again["selected"]
    out = run_cli(["--workdir", workdir, "--checkpoint", "8", "--split", "test", "--json"],
                  module="tljax.evaluate")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert again["selected"]["test"]["top1"] == pytest.approx(result["top1"], abs=1e-6)
    assert again["final"]["test"] == pytest.approx(summary["final"]["test"], abs=1e-6)



@pytest.mark.slow
def test_two_processes_train_together(data_dir, tmp_path):
    """`--distributed`: two processes of four CPU devices (127.0.0.1, gloo) run the program as
    one job: both finish, process 0 writes the metrics, the checkpoint holds the last step."""
    port = free_port()
    workdir = str(tmp_path / "two")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    logs = finish([subprocess.Popen(
        [sys.executable, "-m", "tljax.train", *tiny_args(data_dir, steps=6),
         f"--workdir={workdir}", "--distributed", f"--coordinator_address=127.0.0.1:{port}",
         "--num_processes=2", f"--process_id={i}"], cwd=ROOT, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)])
    assert "8 device(s) in 2 process(es)" in logs[0]
    assert "test (test) top-1" in logs[0] and "top-1" not in logs[1]
    # INFO from process 0 only; the first line names JAX, the backend and the device kind.
    assert "[0] tljax.train: JAX " in logs[0] and "cpu backend: 8 device(s) (cpu)" in logs[0]
    assert "[1] tljax" not in logs[1]  # (a warning would show; there is none)
    assert checkpoints(workdir)[-1] == 6
    assert logged_steps(workdir) == [2, 4, 6]


@pytest.mark.slow
def test_two_processes_read_the_pretrained_weights_once(data_dir, tmp_path):
    """The default job (`init=imagenet`, EfficientNet-Lite0) as two processes of four CPU
    devices, each host with its own home and weights cache: process 0 converts the ImageNet
    weights while process 1 waits, then sends them; only process 0 logs INFO. A second run
    starts from the first's workdir (`init=WORKDIR`), which process 0 alone reads."""

    def two_hosts(name: str, init: str = "") -> list[str]:
        port = free_port()
        procs = []
        for i in range(2):
            home = tmp_path / f"host{i}"
            home.mkdir(exist_ok=True)
            env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "TLJAX_CACHE")}
            env.update(XLA_FLAGS="--xla_force_host_platform_device_count=4", HOME=str(home))
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "tljax.train",
                 f"--config={CONFIG}:steps=4,batch_size=16{init}", "--config.eval_every=4",
                 "--config.log_every=2", "--config.checkpoint_every=4",
                 f"--config.data_dir={data_dir}", f"--workdir={tmp_path / name}",
                 "--distributed", f"--coordinator_address=127.0.0.1:{port}",
                 "--num_processes=2", f"--process_id={i}"], cwd=ROOT, env=env,
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
        return finish(procs)

    logs = two_hosts("imagenet")
    cache = tmp_path / "host0" / ".cache" / "tljax" / "weights" / "efficientnet_lite0"
    assert (f"ImageNet weights of efficientnet_lite0 read by process 0 alone: {cache}"
            in logs[0]), logs[0][-3000:]
    assert "converting" in logs[0]
    # Process 1's host has a cache of its own; it neither converts nor logs at INFO.
    assert "converting" not in logs[1] and "process 0 alone" not in logs[1]
    assert "[1] tljax" not in logs[1] and " INFO " not in logs[1], logs[1][-3000:]
    assert "[0] tljax.train: JAX " in logs[0] and "8 device(s) in 2 process(es)" in logs[0]
    assert "pretrained weights sent from process 0 to 2 processes" in logs[0]
    assert not (tmp_path / "host1" / ".cache" / "tljax" / "weights").exists()
    assert checkpoints(str(tmp_path / "imagenet"))[-1] == 4

    logs = two_hosts("again", init=f",init={tmp_path / 'imagenet'}")
    assert f"init: {tmp_path / 'imagenet'}" in logs[0], logs[0][-3000:]
    assert "pretrained weights sent from process 0 to 2 processes" in logs[0]
    assert checkpoints(str(tmp_path / "again"))[-1] == 4


def test_bn_momentum_override_sets_the_moving_average_rate():
    import jax.numpy as jnp

    from tljax.models import layers

    numerics = layers.Numerics(1e-3, 0.99, True, "raw")

    class Net(layers.nn.Module):
        @layers.nn.compact
        def __call__(self, x, train):
            return layers.batch_norm(numerics, train, jnp.float32, jnp.float32, "bn")(x)

    x = jnp.arange(12.0).reshape(4, 3)
    v = Net().init(jax_key(), x, False)
    for momentum, expected in ((None, 0.99), (0.9, 0.9)):
        _, upd = Net().apply(v, x, layers.TrainMode(bn_momentum=momentum),
                             mutable=["batch_stats"])
        mean = np.asarray(upd["batch_stats"]["bn"]["mean"])
        np.testing.assert_allclose(mean, (1 - expected) * np.asarray(x.mean(0)), rtol=1e-6)


def jax_key():
    import jax

    return jax.random.key(0)


def test_pretrained_merge_replaces_only_a_head_of_another_size(caplog):
    import logging

    from tljax import pretrained

    fresh = {"params": {"stem": {"kernel": np.zeros((3, 3, 3, 8))},
                        "head": {"kernel": np.zeros((8, 10)), "bias": np.zeros(10)}},
             "batch_stats": {"stem": {"mean": np.zeros(8)}}}
    loaded = {"params": {"stem": {"kernel": np.ones((3, 3, 3, 8))},
                         "head": {"kernel": np.ones((8, 1000)), "bias": np.ones(1000)}},
              "batch_stats": {"stem": {"mean": np.ones(8)}}}
    with caplog.at_level(logging.INFO, logger="tljax.pretrained"):
        merged = pretrained.merge(fresh, loaded, "w")
    assert merged["params"]["stem"]["kernel"].min() == 1.0
    assert merged["params"]["head"]["kernel"].shape == (8, 10)
    assert merged["params"]["head"]["kernel"].max() == 0.0
    assert "1000-class head is dropped" in caplog.text
    other = {"params": {**loaded["params"], "stem": {"kernel": np.ones((5, 5, 3, 8))}},
             "batch_stats": loaded["batch_stats"]}
    with pytest.raises(pretrained.InitError, match=r"params/stem/kernel: shape \(5, 5, 3, 8\)"):
        pretrained.merge(fresh, other, "w")
    extra = {"params": {**loaded["params"], "fc1": {"kernel": np.ones((2, 2))}},
             "batch_stats": loaded["batch_stats"]}
    with pytest.raises(pretrained.InitError, match=r"fc1/kernel: in the weights, not in the model"):
        pretrained.merge(fresh, extra, "w")
