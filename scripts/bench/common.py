"""What every benchmark worker shares: the timing protocol, the peak memory, the result line.

Each worker (one framework, one model, in its own process) times three things on the same random
batch: inference, a full fine-tune step (everything trains) and a frozen-backbone step (only the
new head trains, frozen BatchNorm in inference mode). A figure is the median of `steps` timed
calls after `warmup` untimed ones (the first of which compiles, and is reported as the compile
time), with min and max. The worker prints one JSON line starting with RESULT for the driver.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from collections.abc import Callable

KINDS = ("inference", "full_step", "frozen_step")
DTYPES = ("auto", "float32", "bfloat16")


def parser(doc: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=doc)
    p.add_argument("--model", required=True)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--size", type=int, required=True)
    p.add_argument("--steps", type=int, default=5, help="timed calls per figure")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls first (>= 1)")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--kinds", default=",".join(KINDS))
    p.add_argument("--dtype", choices=DTYPES, default="auto",
                   help="computation dtype; auto: float32 on CPU, bfloat16 on an accelerator")
    return p


def measure(fn: Callable[[], object], sync: Callable[[object], object], steps: int,
            warmup: int) -> dict:
    """`fn()` timed: the first call (compilation included), then `steps` calls after `warmup`."""
    times = []
    for _ in range(max(1, warmup) + steps):
        t = time.perf_counter()
        sync(fn())
        times.append(time.perf_counter() - t)
    timed = times[max(1, warmup):]
    return {"first_call_s": times[0], "times_s": timed, "median_s": statistics.median(timed),
            "min_s": min(timed), "max_s": max(timed)}


def peak_rss_mb() -> float:
    """The process's resident-memory high-water mark so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def emit(result: dict) -> None:
    print("RESULT " + json.dumps(result), flush=True)


def fail(framework: str, model: str, why: str) -> None:
    """A peer that cannot run this model says so instead of a figure."""
    emit({"framework": framework, "model": model, "skipped": why})
    sys.exit(0)
