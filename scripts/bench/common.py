"""What every benchmark worker shares: the timing protocol, the peak memory, the result line.

Each worker (one framework, one model, in its own process) times three things on the same random
batch: inference, a full fine-tune step (everything trains) and a frozen-backbone step (only the
new head trains, frozen BatchNorm in inference mode). A figure is the median of `steps` timed
calls after `warmup` untimed ones (the first of which compiles, and is reported as the first
call), with min and max. The worker prints one JSON line starting with RESULT for the driver.

Two ways to run (`run`): on its own, a worker prepares and times one kind after another; with
`--serve`, it takes the driver's commands on stdin, so that the driver can interleave the timed
calls of several frameworks' workers, alive side by side (see scripts/benchmark.py):
  prepare KIND   build and compile KIND, run the untimed calls; answers `READY`
  time N         one untimed call of the prepared KIND (the worker has sat idle while the others
                 ran: its threads asleep, its data out of the caches), then N timed calls;
                 answers `TIMED`
  pair A B N     N rounds of one call of the prepared kind A then one of B (after one untimed
                 call of each): their time ratio B/A per round, both measured within the same
                 second or two, so that a drift of the machine's speed between the kinds'
                 phases does not enter it; answers `PAIRED`
  done           answers with the RESULT line and exits
Standalone, a worker that timed both `inference` and `frozen_step` also pairs them (`PAIR`).
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
PAIR = ("inference", "frozen_step")  # the frozen step's target is a ratio to the forward pass
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
    p.add_argument("--serve", action="store_true",
                   help="take prepare/time/done commands on stdin (the driver's interleaving)")
    return p


def measure(fn: Callable[[], object], sync: Callable[[object], object], steps: int,
            warmup: int) -> dict:
    """`fn()` timed: the first call (compilation included), then `steps` calls after `warmup`."""
    times = []
    for _ in range(max(1, warmup) + steps):
        t = time.perf_counter()
        sync(fn())
        times.append(time.perf_counter() - t)
    entry = {"first_call_s": times[0], "times_s": times[max(1, warmup):]}
    _summarise(entry)
    return entry


def _summarise(entry: dict) -> None:
    timed = entry["times_s"]
    if timed:
        entry.update(median_s=statistics.median(timed), min_s=min(timed), max_s=max(timed))


Prepare = Callable[[str], "tuple[Callable[[], object], dict, Callable[[], dict]]"]


def run(kinds: list[str], prepare: Prepare, sync: Callable[[object], object], args,
        result: dict) -> None:
    """Measure `kinds` and emit `result` with a figure per kind.

    `prepare(kind)` returns `(fn, info, after)`: the no-argument call to time, what is known
    of it before the first call (merged into the kind's figures; a `compile_s` spent ahead of
    the first call is added to `first_call_s`), and a function giving the figures to record
    after the timed calls (memory)."""
    prepared: dict = {}  # kind -> (fn, after, entry); every program is kept for `pair`

    def start(kind: str) -> None:
        fn, info, after = prepare(kind)
        entry = measure(fn, sync, 0, args.warmup)
        entry.update(info)
        entry["first_call_s"] += info.get("compile_s", 0.0)
        result[kind] = entry
        prepared[kind] = (fn, after, entry)

    def call(kind: str) -> float:
        t = time.perf_counter()
        sync(prepared[kind][0]())
        return time.perf_counter() - t

    def timed(kind: str, n: int, rewarm: bool) -> None:
        _, after, entry = prepared[kind]
        if rewarm:
            call(kind)
        entry["times_s"] += [call(kind) for _ in range(n)]
        _summarise(entry)
        entry.update(after())

    def pair(a: str, b: str, n: int) -> None:
        call(a), call(b)
        times = {a: [], b: []}
        for _ in range(n):
            times[a].append(call(a))
            times[b].append(call(b))
        ratios = [tb / ta for ta, tb in zip(times[a], times[b], strict=True)]
        result.setdefault("paired", {})[f"{b}/{a}"] = {
            "ratios": ratios, "median": statistics.median(ratios), "times_s": times}

    if not args.serve:
        for kind in kinds:
            start(kind)
            timed(kind, args.steps, rewarm=False)
        if all(k in prepared for k in PAIR):
            pair(*PAIR, args.steps)
        emit(result)
        return
    print("SERVING", flush=True)
    last = None
    for line in sys.stdin:
        cmd = line.split()
        if not cmd:
            continue
        if cmd[0] == "prepare":
            start(last := cmd[1])
            print("READY", flush=True)
        elif cmd[0] == "time":
            timed(last, int(cmd[1]), rewarm=True)
            print("TIMED", flush=True)
        elif cmd[0] == "pair":
            pair(cmd[1], cmd[2], int(cmd[3]))
            print("PAIRED", flush=True)
        elif cmd[0] == "done":
            break
    emit(result)


def peak_rss_mb() -> float:
    """The process's resident-memory high-water mark so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def emit(result: dict) -> None:
    print("RESULT " + json.dumps(result), flush=True)


def fail(framework: str, model: str, why: str) -> None:
    """A peer that cannot run this model says so instead of a figure."""
    emit({"framework": framework, "model": model, "skipped": why})
    sys.exit(0)
