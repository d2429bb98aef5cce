"""Test setup: quiet TensorFlow, the TensorFlow backend for the Keras reference models (fast to
build and run eagerly on CPU, and independent of XLA), a private weights cache."""

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Eight CPU devices for the multi-device tests; this must be set before JAX starts.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               " --xla_force_host_platform_device_count=8").strip()

# Object storage tests (tests/gcs.py): gcsfs reads this when imported, and without it each of
# its calls first asks a control-plane API that the emulator does not serve.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    """Every test gets its own TLJAX_CACHE, so none depends on what another left behind."""
    monkeypatch.setenv("TLJAX_CACHE", str(tmp_path_factory.mktemp("cache")))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """`digits` prepared once per test module (and xdist worker)."""
    from tljax import datasets

    d = str(tmp_path_factory.mktemp("tfds"))
    datasets.source("digits", d)
    return d


def pytest_report_header(config):
    """Which path of tljax's CPU layers this run tests (tests/test_varying.py names them)."""
    return [_paths()]


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """The same line above the closing one in a quiet run (`-q`), which prints no header."""
    if config.option.verbose < 0:
        terminalreporter.write_line(_paths())


def _paths() -> str:
    from tljax import cpu
    from tljax.native import build

    if cpu.selected() != "native":
        path = f"{cpu.VARIABLE}={cpu.selected()}: the C++ kernels off"
    elif not build.available():
        path = "not built: the pure-JAX rewrites"
    else:
        from tljax.native import conv

        path = (f"C++ for -march={build.march()}, "
                + ("with" if conv.direct_available() else "without")
                + " the AVX-512 direct convolution and product")
    flags = os.environ.get("XLA_FLAGS", "")
    return f"tljax: CPU {build.cpu_isa()}; kernels {path}; XLA_FLAGS={flags!r}"


@pytest.fixture(scope="module")
def gcs_server(tmp_path_factory):
    """A Google Cloud Storage emulator on 127.0.0.1 (tests/gcs.py), per module and worker."""
    from gcs import Server

    with Server(str(tmp_path_factory.mktemp("gcs_seed"))) as url:
        yield url


@pytest.fixture
def gcs(gcs_server, monkeypatch):
    """`gs://BUCKET` of the emulator, with every client of this process pointed at it."""
    from etils.epath import gpath
    from gcs import BUCKET, environment, forget_listings

    def forget():
        forget_listings()  # clients made for another emulator
        gpath._is_tf_installed.cache_clear()  # etils decides on EPATH_USE_TF once, and caches

    for k, v in environment(gcs_server).items():
        monkeypatch.setenv(k, v)
    forget()
    yield f"gs://{BUCKET}"
    monkeypatch.undo()
    forget()
