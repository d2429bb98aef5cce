"""scripts/benchmark.py runs tljax and a peer side by side and writes its table, JSON and chart
(a smoke run at a tiny size; the figures themselves come from the benchmark, not from tests)."""

from __future__ import annotations

import importlib.util
import json
import os

import numpy as np
import pytest

from tljax.native import build

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
                       "--size", "32", "--batch", "2", "--steps", "2", "--warmup", "1",
                       "--json", str(out), "--plot", str(png)]) == 0
    printed = capsys.readouterr().out
    record = json.loads(out.read_text())
    results = {r["framework"]: r for r in record["results"]}
    isa = build.cpu_isa()
    assert record["cpu_isa"] == isa and f"instruction set {isa}" in printed
    assert set(results) == {"tljax", "torch"}
    for r in results.values():
        assert "skipped" not in r, r
        for kind in bench.KINDS:
            assert r[kind]["images_per_s"] > 0 and r[kind]["first_call_s"] > 0
            assert len(r[kind]["times_s"]) == 2  # one timed call per round, two rounds
            assert 0 < r[kind]["mfu"] < 1.5, (r["framework"], kind, r[kind]["mfu"])
    t = results["tljax"]
    assert t["peak_flops"] > 1e9
    assert t["native_avx512"] == (isa == "AVX-512" and t["native_kernels"])
    # The full step does about three forward passes of arithmetic; the frozen step about one.
    fwd = t["inference"]["flops"]
    assert 2.0 < t["full_step"]["flops"] / fwd < 4.0
    assert 0.9 < t["frozen_step"]["flops"] / fwd < 1.2
    # The frozen step's ratio to inference comes from back-to-back pairs of calls (>= 3).
    paired = t["paired"]["frozen_step/inference"]
    assert len(paired["ratios"]) == 3 and all(x > 0 for x in paired["ratios"])
    assert "paired" not in results["torch"]
    assert "tljax/fastest" in printed and "back-to-back pairs" in printed
    # Each peer row also carries tljax's speed over it as the median of per-round ratios.
    for kind in bench.KINDS:
        ratios = [p / q for q, p in zip(t[kind]["times_s"], results["torch"][kind]["times_s"],
                                        strict=True)]
        assert results["torch"][kind]["tljax_speedup_paired"] == pytest.approx(
            float(np.median(ratios)))
        assert "tljax_speedup_paired" not in t[kind]
    assert "median of per-round ratios" in printed
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


def test_benchmark_reports_a_worker_that_cannot_run_the_model(tmp_path):
    """A worker that refuses the model at start-up (PyTorch's InceptionV3, as Keras's, takes
    nothing smaller than 75x75) ends the interleaved protocol with its reason instead of a
    figure."""
    pytest.importorskip("torch")
    bench = load_benchmark()
    bench.main(["--models", "inception_v3", "--frameworks", "torch", "--size", "64",
                "--plot", "", "--json", str(tmp_path / "b.json")])
    (r,) = json.loads((tmp_path / "b.json").read_text())["results"]
    assert r["framework"] == "torch"
    assert "inception_v3 takes inputs of at least 75x75 (as Keras's), got 64x64" in r["skipped"]


@pytest.mark.parametrize("model", ["resnet50", "efficientnet_b0", "inception_v3", "vgg19"])
def test_torch_peers_train_as_many_parameters_as_tljax(model):
    """The PyTorch peers are the same architectures: as many trainable parameters as tljax's
    models (Keras's), and a frozen backbone leaves only the head's."""
    torch = pytest.importorskip("torch")
    import sys

    import jax

    from tljax import models
    sys.path.insert(0, os.path.join(ROOT, "scripts", "bench"))
    import torch_models

    size = {"inception_v3": 75}.get(model, 32)
    peer = torch_models.create(model, 10, size)
    trainable = sum(p.numel() for p in peer.parameters() if p.requires_grad)
    variables = models.random_variables(models.create(model, num_classes=10), size)
    assert trainable == sum(x.size for x in jax.tree.leaves(variables["params"]))
    frozen = {id(p) for m in torch_models.backbone(peer) for p in m.parameters()}
    head = sum(p.numel() for p in peer.parameters() if id(p) not in frozen)
    assert head == sum(x.size for x in jax.tree.leaves(variables["params"]["head"]))
    with torch.no_grad():
        assert peer.eval()(torch.rand(1, 3, size, size) * 255).shape == (1, 10)


def test_model_flops_counts_convolutions_and_matmuls():
    """Model FLOPs (scripts/bench/flops.py): 2 x multiply-adds of each convolution (dense,
    grouped, and the gradients JAX writes for them) and matrix product, from the jaxpr."""
    import sys

    import jax
    import jax.numpy as jnp

    sys.path.insert(0, os.path.join(ROOT, "scripts", "bench"))
    import flops

    n, h, w, c, o = 2, 8, 6, 4, 5
    x = jnp.ones((n, h, w, c))
    dense, depthwise = jnp.ones((3, 3, c, o)), jnp.ones((3, 3, 1, c))
    dn = ("NHWC", "HWIO", "NHWC")

    def conv(x, k, groups=1, stride=1):
        return jax.lax.conv_general_dilated(x, k, (stride, stride), "SAME",
                                            dimension_numbers=dn, feature_group_count=groups)

    assert flops.model_flops(conv, x, dense) == 2 * n * h * w * o * 9 * c
    assert flops.model_flops(lambda x, k: conv(x, k, c), x, depthwise) == 2 * n * h * w * c * 9
    assert flops.model_flops(lambda x, k: conv(x, k, 1, 2), x, dense) == 2 * n * 4 * 3 * o * 9 * c
    # Gradients with respect to input and kernel: each costs as much as the forward pass.
    for k, groups, fwd in ((dense, 1, 2 * n * h * w * o * 9 * c),
                           (depthwise, c, 2 * n * h * w * c * 9)):
        grad = jax.grad(lambda x, k, g=groups: conv(x, k, g).sum(), argnums=(0, 1))
        assert flops.model_flops(grad, x, k) == 3 * fwd
    a, b = jnp.ones((7, 3, 11)), jnp.ones((11, 13))
    assert flops.model_flops(lambda a, b: a @ b, a, b) == 2 * 7 * 3 * 13 * 11


def test_profile_ops_charges_gaps_to_the_op_before_them_within_a_call(monkeypatch):
    """`profile_ops.attribute`: an op's time is its event plus the idle gap after it (XLA:CPU's
    asynchronous convolutions), but a gap in which the next call starts is the host's time
    between calls, not the last op's."""
    monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", ""))  # restored afterwards
    spec = importlib.util.spec_from_file_location(
        "profile_ops", os.path.join(ROOT, "scripts", "bench", "profile_ops.py"))
    profile_ops = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(profile_ops)

    def event(name, ts, dur):
        return {"ph": "X", "name": name, "ts": ts, "dur": dur}

    events = [event("PjitFunction(step)", 0, 5), event("conv", 10, 10), event("add", 50, 10),
              event("PjitFunction(step)", 100, 5), event("conv", 150, 10), event("add", 170, 20),
              event("unrelated", 60, 500)]
    got = profile_ops.attribute(events, {"conv": (), "add": ()}, calls=2)
    # conv: 10 + 30 idle (call 1), 10 + 10 idle (call 2); add: 10 + 20; between: 60 to 150.
    assert got == {"conv": 0.03, "add": 0.015, profile_ops.BETWEEN_CALLS: 0.045}

