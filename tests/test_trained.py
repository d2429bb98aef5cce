"""After training: a run on a folder of `cat`, `dog` and `ferret` images, used as a user would
use it: predicted from its workdir and from its export with those names, loaded with
`models.load`, and each compared with `tljax.evaluate` on the same images."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from processes import config_module

CLASSES = ("cat", "dog", "ferret")
pytestmark = pytest.mark.xdist_group("trained")


def write_images(root, per_class: int, seed: int, misleading: bool = False) -> None:
    """Class k's images are noisy and mostly of colour channel k (PNG and JPEG mixed); with
    `misleading`, every third one is mostly of a random channel instead."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for k, name in enumerate(CLASSES):
        os.makedirs(root / name, exist_ok=True)
        for i in range(per_class):
            h, w = rng.integers(24, 48, size=2)
            image = rng.integers(0, 90, (h, w, 3))
            channel = rng.integers(3) if misleading and i % 3 == 0 else k
            image[..., channel] += rng.integers(90, 160)
            ext = ".png" if i % 2 else ".jpg"
            Image.fromarray(image.astype(np.uint8)).save(root / name / f"{i}{ext}")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """`(workdir, images)`: 12 steps of `test_resnet` on the folder dataset, with a moving
    average of the parameters (selected on, so every reader must pick it)."""
    from tljax import train

    images = tmp_path_factory.mktemp("pets")
    write_images(images / "train", 24, 0)
    write_images(images / "validation", 6, 1, misleading=True)
    c = config_module().get_config(
        f"model=test_resnet,init=scratch,steps=12,batch_size=16,dataset=folder:{images}")
    c.image_size, c.eval_every, c.log_every, c.checkpoint_every = 32, 6, 6, 6
    # BatchNorm statistics that follow a run this short, so that its logits stay moderate.
    c.ema_decay, c.bn_momentum = 0.5, 0.5
    workdir = str(tmp_path_factory.mktemp("run") / "pets")
    train.train_and_evaluate(c, workdir)
    return workdir, images


def test_the_run_records_what_its_outputs_mean(run):
    workdir, _ = run
    with open(os.path.join(workdir, "model.json")) as f:
        record = json.load(f)
    assert record["classes"] == list(CLASSES)
    assert record["model"] == "test_resnet" and record["input_size"] == 32
    assert record["options"]["num_classes"] == 3 and record["eval_crop"] == 0.875
    assert record["dataset"].startswith("folder:")


def predictions(capsys, args: list[str]) -> list[dict]:
    from tljax.predict import main

    assert main(["--json", "--top", "3", *args]) == 0
    return json.loads(capsys.readouterr().out)


def top1(results: list[dict]) -> float:
    """The share of images whose top class is their folder's name."""
    return float(np.mean([r["predictions"][0]["name"] == os.path.basename(
        os.path.dirname(r["image"])) for r in results]))


def test_predict_from_the_workdir_and_its_export_agrees_with_evaluate(run, tmp_path, capsys):
    from tljax import evaluate, weights
    from tljax.export import main as export_main

    workdir, images = run
    expected = evaluate.evaluate(workdir, split="validation")
    assert expected["params"] == "ema" and expected["examples"] == 18

    from_workdir = predictions(capsys, ["--weights", workdir, str(images / "validation")])
    assert len(from_workdir) == 18
    assert {p["name"] for r in from_workdir for p in r["predictions"]} == set(CLASSES)
    assert top1(from_workdir) == pytest.approx(expected["top1"], abs=1e-9)
    assert 0.4 < expected["top1"] < 1  # a model that learnt, on images it can get wrong

    out = str(tmp_path / "export")
    assert export_main([workdir, out]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out} (" in printed and "MiB): test_resnet, 3 classes (cat, dog, ferret)" \
        in printed and f"step {expected['step']} (moving average)" in printed
    assert sorted(os.listdir(out)) == ["tljax_weights.json", "variables"]
    record = weights.record(out)
    assert record["classes"] == list(CLASSES) and record["options"]["num_classes"] == 3
    assert set(weights.load(out)) == {"params", "batch_stats"}  # no optimizer state

    from_export = predictions(capsys, ["--weights", out, *[r["image"] for r in from_workdir]])
    assert from_export == from_workdir


def test_models_load_of_a_workdir_gives_the_evaluation_logits(run):
    import glob

    import jax

    from tljax import checkpoint, evaluate, models, predict, trained

    workdir, images = run
    module, variables, classes = models.load(workdir)
    assert classes == list(CLASSES)
    paths = sorted(glob.glob(str(images / "validation" / "*" / "*")))
    labels = np.array([CLASSES.index(os.path.basename(os.path.dirname(p))) for p in paths])
    t = trained.load(workdir)
    x = t.preprocess(predict.load_images(t, paths))
    logits = np.asarray(module.apply(variables, x), np.float64)
    top = logits.max(1)
    loss = np.mean(top + np.log(np.exp(logits - top[:, None]).sum(1))
                   - logits[np.arange(len(labels)), labels])
    expected = evaluate.evaluate(workdir, split="validation")
    assert np.mean(logits.argmax(1) == labels) == pytest.approx(expected["top1"], abs=1e-9)
    assert loss == pytest.approx(expected["loss"], rel=1e-4, abs=1e-6)  # float32 sums
    # The evaluation's own variables: restored onto the devices from the checkpoint it chose.
    ckpts = checkpoint.Checkpoints(os.path.join(workdir, "checkpoints"), asynchronous=False)
    target = jax.tree.map(np.asarray, variables)
    own = ckpts.restore_variables(expected["step"], target, "ema")
    ckpts.close()
    np.testing.assert_allclose(np.asarray(module.apply(own, x)), logits, rtol=1e-6, atol=1e-6)
    # The raw parameters of the latest step are another model.
    raw = trained.load(workdir, "latest", "raw")
    assert raw.origin == f"{workdir} step 12"
    assert not np.allclose(np.asarray(raw.module.apply(raw.variables, x)), logits)


def test_predict_on_another_models_weights_names_both(run, capsys):
    from tljax.predict import main

    workdir, images = run
    image = next(iter((images / "validation" / "cat").iterdir()))
    assert main(["--model", "resnet50", "--weights", workdir, str(image)]) == 2
    assert "holds weights of 'test_resnet', not 'resnet50'" in capsys.readouterr().err
    assert main(["--weights", workdir, "--step", "5", str(image)]) == 2
    assert "has no checkpoint at step 5; it has [6, 12]" in capsys.readouterr().err


def test_a_workdir_without_model_json_reads_with_class_indices(run, tmp_path, capsys, caplog):
    """A workdir written before runs recorded model.json: the model from config.json, the
    classes as indices (said in the log)."""
    import shutil

    from tljax.predict import main

    workdir, images = run
    old = str(tmp_path / "old")
    shutil.copytree(workdir, old)
    os.remove(os.path.join(old, "model.json"))
    image = str(images / "validation" / "dog" / "1.png")
    assert main(["--json", "--weights", old, image]) == 0
    indices = json.loads(capsys.readouterr().out)[0]["predictions"]
    assert {p["name"] for p in indices} == {"0", "1", "2"} and "has no model.json" in caplog.text
    named = predictions(capsys, ["--weights", workdir, image])[0]["predictions"]
    assert [(CLASSES[p["index"]], p["probability"]) for p in indices] == [
        (p["name"], p["probability"]) for p in named]  # the same model and checkpoint


def test_the_packaged_config_is_named_by_its_name():
    from tljax import train

    packaged = train._config_path("finetune")
    assert packaged.endswith(os.path.join("configs", "finetune.py"))
    assert train._packaged_config(["prog", "--config=finetune:steps=4", "--workdir=w"]) == [
        "prog", f"--config={packaged}:steps=4", "--workdir=w"]
    assert train._packaged_config(["prog", "--config", "finetune.py"]) == [
        "prog", "--config", packaged]
    mine = os.path.join("configs", "finetune.py")  # a path is left as it is
    assert train._packaged_config(["prog", f"--config={mine}"]) == ["prog", f"--config={mine}"]
