"""scripts/benchmark.py runs tljax and a peer side by side and writes its table, JSON and chart
(a smoke run at a tiny size; the figures themselves come from the benchmark, not from tests)."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_benchmark():
    spec = importlib.util.spec_from_file_location(
        "benchmark", os.path.join(ROOT, "scripts", "benchmark.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_runs_tljax_beside_torch(tmp_path, capsys):
    pytest.importorskip("torch")
    bench = load_benchmark()
    out = tmp_path / "bench.json"
    png = tmp_path / "bench.png"
    assert bench.main(["--models", "resnet50", "--frameworks", "tljax", "torch",
                       "--size", "32", "--batch", "2", "--steps", "1", "--warmup", "1",
                       "--json", str(out), "--plot", str(png)]) == 0
    printed = capsys.readouterr().out
    results = {r["framework"]: r for r in json.loads(out.read_text())["results"]}
    assert set(results) == {"tljax", "torch"}
    for r in results.values():
        assert "skipped" not in r, r
        for kind in bench.KINDS:
            assert r[kind]["images_per_s"] > 0 and r[kind]["first_call_s"] > 0
            assert 0 < r[kind]["mfu"] < 1.5, (r["framework"], kind, r[kind]["mfu"])
    t = results["tljax"]
    assert t["peak_flops"] > 1e9
    # The full step does about three forward passes of arithmetic; the frozen step about one.
    fwd = t["inference"]["flops"]
    assert 2.0 < t["full_step"]["flops"] / fwd < 4.0
    assert 0.9 < t["frozen_step"]["flops"] / fwd < 1.2
    assert "tljax/fastest" in printed and "frozen-step time / inference time" in printed
    assert png.stat().st_size > 10_000


def test_benchmark_names_a_peer_that_cannot_run(tmp_path, capsys, monkeypatch):
    bench = load_benchmark()
    monkeypatch.setattr(bench, "installed", lambda f: "not installed: keras")
    bench.main(["--models", "vgg19", "--frameworks", "keras-tensorflow", "--plot", "",
                "--json", str(tmp_path / "b.json")])
    assert "skipped keras-tensorflow vgg19: not installed: keras" in capsys.readouterr().out
    results = json.loads((tmp_path / "b.json").read_text())["results"]
    assert results == [{"framework": "keras-tensorflow", "model": "vgg19",
                        "skipped": "not installed: keras"}]
