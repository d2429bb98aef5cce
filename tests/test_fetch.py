"""`python -m tljax.weights fetch`: download from a base address ($TLJAX_WEIGHTS_URL), verify
the MD5 that Keras publishes, convert, cache. Tested against an HTTP server on 127.0.0.1 that
serves files made here (the registry's MD5 is pointed at the served file's)."""

from __future__ import annotations

import functools
import hashlib
import http.server
import os
import threading

import keras_reference as kr
import numpy as np
import pytest

from tljax import weights
from tljax.models import registry
from tljax.weights import fetch as fetch_mod
from tljax.weights.__main__ import main as weights_cli


class _Handler(http.server.SimpleHTTPRequestHandler):
    requests: list[str] = []

    def do_GET(self):  # noqa: N802 - http.server's name
        type(self).requests.append(self.path)
        super().do_GET()

    def log_message(self, *args):
        pass


@pytest.fixture
def server(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    _Handler.requests = []
    handler = functools.partial(_Handler, directory=str(root))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{httpd.server_address[1]}/"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(scope="module")
def resnet50_notop_file(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("keras") / "notop.h5")
    return kr.save_legacy_h5(kr.build("resnet50", False, 32), path)


def _official_notop(server, path, monkeypatch):
    """Point the base address at the local server and the registry's ResNet50 notop MD5 at
    the file made here; returns (server root, WeightFile, file bytes)."""
    root, url = server
    monkeypatch.setenv("TLJAX_WEIGHTS_URL", url)
    spec = registry.spec("resnet50")
    data = open(path, "rb").read()
    wf = registry.WeightFile(spec.weights["notop"].path, hashlib.md5(data).hexdigest())
    monkeypatch.setitem(spec.weights, "notop", wf)
    return root, wf, data


def _serve(root, wf, data: bytes):
    dest = root / wf.path
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_bytes(data)


def test_fetch_downloads_verifies_converts_and_caches(server, resnet50_notop_file, monkeypatch,
                                                      capsys):
    root, wf, data = _official_notop(server, resnet50_notop_file, monkeypatch)
    _serve(root, wf, data)

    assert weights_cli(["fetch", "resnet50", "--notop", "-q"]) == 0
    path = capsys.readouterr().out.strip().splitlines()[-1]
    assert path == os.path.join(os.environ["TLJAX_CACHE"], "weights", "resnet50_notop")
    rec = weights.record(path)
    assert rec["source"]["md5"] == wf.md5 and rec["options"] == {"include_top": False}
    assert "params" in weights.load(path)
    assert _Handler.requests == ["/" + wf.path]

    # A second fetch finds the verified checkpoint and downloads nothing.
    assert fetch_mod.fetch("resnet50", notop=True, progress=False) == path
    assert len(_Handler.requests) == 1


def test_corrupted_download_is_refused_and_removed(server, resnet50_notop_file, monkeypatch):
    root, wf, data = _official_notop(server, resnet50_notop_file, monkeypatch)
    corrupted = bytearray(data)
    corrupted[len(data) // 2] ^= 0xFF
    _serve(root, wf, bytes(corrupted))

    with pytest.raises(fetch_mod.FetchError, match=f"corrupt: MD5 .* expected {wf.md5}"):
        fetch_mod.fetch("resnet50", notop=True, progress=False)
    downloads = os.path.join(os.environ["TLJAX_CACHE"], "downloads")
    assert os.listdir(downloads) == []  # neither the file nor a .part is left behind
    assert not os.path.exists(os.path.join(os.environ["TLJAX_CACHE"], "weights"))


def test_missing_file_on_the_server(server, monkeypatch, capsys):
    _, url = server
    monkeypatch.setenv("TLJAX_WEIGHTS_URL", url)
    assert weights_cli(["fetch", "vgg16", "-q"]) == 2
    err = capsys.readouterr().err
    assert "could not download" in err and "vgg16_weights_tf_dim_ordering_tf_kernels.h5" in err


def test_fetch_of_a_model_without_official_keras_weights(monkeypatch, capsys):
    assert weights_cli(["fetch", "efficientnet_lite0"]) == 2
    assert "no official Keras weight file" in capsys.readouterr().err


def test_default_base_url_is_keras_own(monkeypatch):
    monkeypatch.delenv("TLJAX_WEIGHTS_URL", raising=False)
    wf = registry.spec("efficientnet_b0").weights["top"]
    assert fetch_mod.base_url() + wf.path == fetch_mod.DEFAULT_BASE_URL + \
        "keras-applications/efficientnetb0.h5"


def test_load_in_one_call_fetches_and_replaces_the_head(server, resnet50_notop_file,
                                                         monkeypatch):
    """`models.load('resnet50', 'imagenet', num_classes=3)` fetches the notop file from the
    server, converts it, and returns the module with those weights and a fresh 3-class head."""
    from tljax import models

    root, wf, data = _official_notop(server, resnet50_notop_file, monkeypatch)
    _serve(root, wf, data)
    module, variables = models.load("resnet50", "imagenet", num_classes=3)
    assert module.num_classes == 3 and variables["params"]["head"]["kernel"].shape == (2048, 3)
    converted = weights.load(os.path.join(os.environ["TLJAX_CACHE"], "weights",
                                          "resnet50_notop"))
    np.testing.assert_array_equal(variables["params"]["stage4"]["block3"]["conv3"]["kernel"],
                                  converted["params"]["stage4"]["block3"]["conv3"]["kernel"])
    assert len(_Handler.requests) == 1
