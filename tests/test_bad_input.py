"""Bad input gets an error that names what is wrong and what was expected, never a traceback
from deep inside h5py, torch or Flax as its only message, and never wrong numbers."""

from __future__ import annotations

import subprocess
import sys

import keras_reference as kr
import numpy as np
import pytest
import torch

from tljax import weights
from tljax.predict import main as predict_main
from weights_conversion.__main__ import main as convert_cli


@pytest.fixture(scope="module")
def resnet50_files(tmp_path_factory):
    """Keras ResNet50 weights, with and without the top, in the legacy HDF5 layout."""
    folder = tmp_path_factory.mktemp("resnet50")
    top = kr.save_legacy_h5(kr.build("resnet50", True, 32), str(folder / "top.h5"))
    notop = kr.save_legacy_h5(kr.build("resnet50", False, 32), str(folder / "notop.h5"))
    return top, notop


def run_convert(capsys, *args):
    code = convert_cli(list(args))
    return code, capsys.readouterr().err


def test_unknown_model_name_suggests_the_closest(capsys, resnet50_files, tmp_path):
    code, err = run_convert(capsys, "--model", "resnet05", "--input", resnet50_files[0],
                            "--output", str(tmp_path / "out"))
    assert code == 2 and "unknown model 'resnet05'" in err and "did you mean 'resnet50'" in err


def test_truncated_hdf5_is_refused(capsys, resnet50_files, tmp_path):
    data = open(resnet50_files[1], "rb").read()
    cut = tmp_path / "truncated.h5"
    cut.write_bytes(data[: len(data) // 2])
    code, err = run_convert(capsys, "--model", "resnet50", "--input", str(cut),
                            "--output", str(tmp_path / "out"))
    assert code == 2 and "truncated or corrupt" in err and "truncated.h5" in err
    assert not (tmp_path / "out").exists()


def test_file_of_another_architecture_is_refused(capsys, resnet50_files, tmp_path):
    code, err = run_convert(capsys, "--model", "vgg19", "--input", resnet50_files[0],
                            "--output", str(tmp_path / "out"))
    assert code == 2
    assert "missing from the file" in err and "'block1_conv1'" in err
    assert "conv1_conv" in err and "another architecture" in err
    assert not (tmp_path / "out").exists()


def test_notop_file_for_a_model_with_a_top_is_refused(capsys, resnet50_files, tmp_path):
    code, err = run_convert(capsys, "--model", "resnet50", "--input", resnet50_files[1],
                            "--output", str(tmp_path / "out"), "--include-top")
    assert code == 2 and "notop" in err and "include_top=False" in err


def test_top_file_for_a_notop_model_is_refused(capsys, resnet50_files, tmp_path):
    code, err = run_convert(capsys, "--model", "resnet50", "--input", resnet50_files[0],
                            "--output", str(tmp_path / "out"), "--no-include-top")
    assert code == 2 and "predictions" in err and "include_top=True" in err


def test_notop_checkpoint_cannot_classify(capsys, resnet50_files, tmp_path):
    assert convert_cli(["--model", "resnet50", "--input", resnet50_files[1],
                        "--output", str(tmp_path / "notop")]) == 0
    capsys.readouterr()
    assert weights.record(tmp_path / "notop")["options"] == {"include_top": False}
    image = tmp_path / "x.png"
    from PIL import Image

    Image.fromarray(kr.images(1, 64)[0]).save(image)
    code = predict_main(["--model", "resnet50", "--weights", str(tmp_path / "notop"), str(image)])
    err = capsys.readouterr().err
    assert code == 2 and "notop checkpoint" in err


def test_checkpoint_of_another_model_is_refused_by_predict(capsys, resnet50_files, tmp_path):
    assert convert_cli(["--model", "resnet50", "--input", resnet50_files[0],
                        "--output", str(tmp_path / "r50")]) == 0
    capsys.readouterr()
    code = predict_main(["--model", "vgg16", "--weights", str(tmp_path / "r50"), "x.png"])
    assert code == 2 and "holds weights of 'resnet50'" in capsys.readouterr().err


def test_wrong_shape_names_the_layer_and_both_shapes(capsys, tmp_path):
    import h5py

    km = kr.build("efficientnet_b0", False, 32)
    path = kr.save_legacy_h5(km, str(tmp_path / "b0.h5"))
    with h5py.File(path, "r+") as f:  # corrupt one kernel's shape, as a wrong file would
        name = "stem_conv/kernel"
        del f["stem_conv"][name]
        f["stem_conv"].create_dataset(name, data=np.zeros((5, 5, 3, 32), np.float32))
    code, err = run_convert(capsys, "--model", "efficientnet_b0", "--input", path,
                            "--output", str(tmp_path / "out"))
    assert code == 2
    assert "layer 'stem_conv'" in err and "(5, 5, 3, 32) in the file" in err
    assert "(3, 3, 3, 32) in the model" in err


def test_torch_file_with_pickled_objects_is_never_unpickled(capsys, tmp_path):
    path = tmp_path / "module.pth"
    torch.save(torch.nn.Linear(2, 2), path)  # a whole module object, not a state dict
    code, err = run_convert(capsys, "--model", "efficientnet_lite0", "--input", str(path),
                            "--output", str(tmp_path / "out"))
    assert code == 2 and "never unpickles" in err and "state_dict" in err


def test_torch_file_with_non_tensor_values_is_refused(capsys, tmp_path):
    path = tmp_path / "odd.pth"
    torch.save({"_conv_stem.weight": torch.zeros(1), "epoch": 3}, path)
    code, err = run_convert(capsys, "--model", "efficientnet_lite0", "--input", str(path),
                            "--output", str(tmp_path / "out"))
    assert code == 2 and "mapping names to tensors" in err and "'epoch': int" in err


def test_torch_file_for_a_keras_only_model_is_refused(capsys, tmp_path):
    path = tmp_path / "sd.pth"
    torch.save({"w": torch.zeros(1)}, path)
    code, err = run_convert(capsys, "--model", "resnet50", "--input", str(path),
                            "--output", str(tmp_path / "out"))
    assert code == 2 and "EfficientNet-Lite" in err


def test_not_a_weight_file(capsys, tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello")
    code, err = run_convert(capsys, "--model", "resnet50", "--input", str(path),
                            "--output", str(tmp_path / "out"))
    assert code == 2 and "not a Keras HDF5 file nor a torch state dict" in err
    code, err = run_convert(capsys, "--model", "resnet50", "--input", str(tmp_path / "nope.h5"),
                            "--output", str(tmp_path / "out"))
    assert code == 2 and "does not exist" in err


def test_missing_or_foreign_checkpoint_directory(tmp_path):
    with pytest.raises(weights.WeightsError, match="does not exist"):
        weights.load(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(weights.WeightsError, match="not a tljax weights checkpoint"):
        weights.load(tmp_path / "empty")


def test_corrupt_image_is_named(capsys, tmp_path):
    from tljax.weights.fetch import bundled_lite0

    ckpt = bundled_lite0(str(tmp_path / "cache"))
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    code = predict_main(["--model", "efficientnet_lite0", "--weights", ckpt, str(bad)])
    err = capsys.readouterr().err
    assert code == 2 and "broken.jpg cannot be decoded" in err


def test_cli_error_is_one_line_not_a_traceback(resnet50_files, tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "weights_conversion", "--model", "vgg19", "--input",
         resnet50_files[0], "--output", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 2
    assert "Traceback" not in out.stderr and "error: vgg19:" in out.stderr
