"""Test setup: quiet TensorFlow, the TensorFlow backend for the Keras reference models (fast to
build and run eagerly on CPU, and independent of XLA), a private weights cache."""

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Eight CPU devices for the multi-device tests; this must be set before JAX starts.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               " --xla_force_host_platform_device_count=8").strip()

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    """Every test gets its own TLJAX_CACHE, so none depends on what another left behind."""
    monkeypatch.setenv("TLJAX_CACHE", str(tmp_path_factory.mktemp("cache")))
