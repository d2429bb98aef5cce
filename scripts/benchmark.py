"""tljax beside its peers, same machine, same run: images/s of inference, a full fine-tune step
and a frozen-backbone step (head only), compile time, peak memory, and MFU.

    python scripts/benchmark.py --quick          # ResNet50 + B0 beside PyTorch, 112x112, ~3 min
    python scripts/benchmark.py                  # four models at their native sizes
    python scripts/benchmark.py --models resnet50 --frameworks tljax torch --json r50.json

Each framework runs each model in its own process (scripts/bench/run_*.py); the processes for
one model live side by side and their timed calls are interleaved (`run_model`), so that the
ratios hold on a machine whose speed drifts (a shared 2-core VM: +-25% from minute to minute):
  tljax             the library's forward pass and train step (`tljax.train_step`, jit/shard_map)
  keras-jax         Keras 3 Applications on the JAX backend (XLA)
  keras-tensorflow  Keras 3 on TensorFlow, `tf.function` without XLA (oneDNN kernels)
  keras-torch       Keras 3 on PyTorch (eager)
  torch             plain PyTorch eager, channels-last, the same architectures
                    (scripts/bench/torch_models.py)
  torch-compile     the same with `torch.compile` (slow to compile; not in --quick)
Peers that are not installed are skipped and listed. Every figure is the median of --steps timed
calls (one per round, the frameworks taking turns) after --warmup untimed ones (the first call,
compilation included, is the "first call" column), with min and max in the JSON. Frozen steps
freeze everything but the new head, with frozen BatchNorm in inference mode (Keras's
`trainable=False`). fp32 on CPU, bf16 on GPU/TPU
(tljax and torch; Keras peers run on CPU only).

MFU: the tljax program's model FLOPs (convolutions and matmuls of its jaxpr, bench/flops.py)
over the step time, divided by the matmul peak measured in the same run (tljax worker); the
peers do the same arithmetic, so their MFU is tljax's FLOPs over their time. The tljax details
also give each program's roofline floor: the larger of its FLOPs at the matmul peak and XLA's
count of bytes accessed at the measured copy bandwidth (a program far above the floor on both
is bound by neither, e.g. launch overheads).
Results: the printed table, `--json PATH`, and a bar chart (`--plot PATH`, default
benchmark.png).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import queue
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(HERE, "bench"))
from common import DTYPES, KINDS, PAIR  # noqa: E402  (the workers' options and measurements)

MODELS = {"resnet50": 224, "efficientnet_b0": 224, "inception_v3": 299, "vgg19": 224}
FRAMEWORKS = ("tljax", "keras-jax", "keras-tensorflow", "keras-torch", "torch", "torch-compile")
# --quick: the two target models against PyTorch eager, at 112x112, within ~3 minutes on 2 CPU
# cores. Keras on JAX is left to the full run: building its EfficientNet-B0 alone takes ~32 s
# there, and with it --quick took 4.9 min.
QUICK = dict(models=["resnet50", "efficientnet_b0"], frameworks=["tljax", "torch"],
             size=112, steps=7, warmup=1)


def installed(framework: str) -> str | None:
    """None when `framework` can run here, else why not."""
    need = {"tljax": ["jax"], "keras-jax": ["keras", "jax"],
            "keras-tensorflow": ["keras", "tensorflow"], "keras-torch": ["keras", "torch"],
            "torch": ["torch"], "torch-compile": ["torch"]}[framework]
    missing = [m for m in need if importlib.util.find_spec(m) is None]
    return f"not installed: {', '.join(missing)}" if missing else None


def command(framework: str, model: str, args, size: int) -> list[str]:
    common = ["--model", model, "--batch", str(args.batch), "--size", str(size),
              "--steps", str(args.steps), "--warmup", str(args.warmup),
              "--classes", str(args.classes), "--kinds", ",".join(args.kinds),
              "--dtype", args.dtype]
    if framework == "tljax":
        return [sys.executable, os.path.join(HERE, "bench", "run_tljax.py")] + common
    if framework.startswith("keras-"):
        return [sys.executable, os.path.join(HERE, "bench", "run_keras.py"),
                "--backend", framework.split("-", 1)[1]] + common
    extra = ["--compile"] if framework == "torch-compile" else []
    return [sys.executable, os.path.join(HERE, "bench", "run_torch.py")] + common + extra


# The host-memory policy tljax's worker sets in its own process (tljax/host_memory.py: glibc keeps
# freed memory instead of page-faulting every step's buffers in again), as environment variables
# that glibc reads at start: with --peer-malloc same (the default) every peer runs under it too,
# so that the table compares frameworks, not allocator settings. The trim threshold is SIZE_MAX,
# "never", as tljax's mallopt(M_TRIM_THRESHOLD, -1) (2**31 - 1 still trims a heap with more than
# 2 GiB free at its top: a freed 2.5 GiB block moved the program break back).
SAME_MALLOC = {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_MAX_": "0",
               "MALLOC_TRIM_THRESHOLD_": str(2**64 - 1)}


def worker_env(framework: str = "tljax", peer_malloc: str = "same") -> dict:
    env = dict(os.environ)
    if framework != "tljax" and peer_malloc == "same":
        env.update(SAME_MALLOC)
    # One device per process: an inherited request for 8 virtual CPU devices (the tests') would
    # split the cores' thread pool and is not what a user's run sees.
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", ""))
    env["XLA_FLAGS"] = flags.strip()
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


class Worker:
    """One framework's worker process for one model, serving the driver's commands
    (scripts/bench/common.py: prepare KIND, time N, done)."""

    def __init__(self, framework: str, model: str, args, size: int):
        self.framework, self.model, self.args = framework, model, args
        self.started = time.time()
        self.deadline = self.started + args.timeout
        self.stderr = tempfile.TemporaryFile(mode="w+")
        self.stdout: list[str] = []
        self.lines: queue.Queue = queue.Queue()
        self.proc = subprocess.Popen(command(framework, model, args, size) + ["--serve"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.stderr, text=True, bufsize=1,
                                     env=worker_env(framework, args.peer_malloc))
        threading.Thread(target=self._read, daemon=True).start()
        self.result: dict | None = None

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def _fail(self, why: str) -> None:
        self.proc.kill()
        self.proc.wait()
        self.stderr.seek(0)
        tail = (self.stderr.read() or "\n".join(self.stdout)).strip().splitlines()[-3:]
        self.result = {"framework": self.framework, "model": self.model,
                       "skipped": f"{why}: " + " | ".join(tail) if tail else why}

    def ask(self, command: str | None, answer: str | None) -> bool:
        """Send `command` (None: just wait), wait for the line `answer` (None: for the RESULT
        line); False when the worker gave its RESULT instead, or ended, failed or ran past
        --timeout (then with a skipped result saying so)."""
        if self.result is not None:
            return False
        if command:
            try:
                self.proc.stdin.write(command + "\n")
                self.proc.stdin.flush()
            except (BrokenPipeError, OSError):
                pass  # it has exited: its last lines say why
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, self.deadline - time.time()))
            except queue.Empty:
                self._fail(f"no result within --timeout {self.args.timeout} s")
                return False
            if line is None:
                self.proc.wait()
                self._fail(f"failed (status {self.proc.returncode})")
                return False
            self.stdout.append(line)
            if line.startswith("RESULT "):  # a peer that cannot run this model says so
                self._finish(line)
                return False
            if answer is not None and line == answer:
                return True

    def _finish(self, line: str) -> None:
        self.result = json.loads(line[len("RESULT "):])
        self.result["process_s"] = round(time.time() - self.started, 1)
        self.proc.wait()

    def close(self) -> dict:
        if self.result is None:
            self.ask("done", None)
        if self.args.logs:
            os.makedirs(self.args.logs, exist_ok=True)
            self.stderr.seek(0)
            with open(os.path.join(self.args.logs, f"{self.framework}_{self.model}.log"),
                      "w") as f:
                f.write("\n".join(self.stdout) + "\n--- stderr ---\n" + self.stderr.read())
        return self.result


def run_model(model: str, frameworks: list[str], args, size: int) -> list[dict]:
    """Every framework's figures for `model`, measured interleaved: the workers live side by
    side, each is started, and each kind compiled, while the others wait (so that compile
    times are not shared), then the timed calls alternate between them, one call each (after
    an untimed one) in a rotating order for --steps rounds, so that a slow spell of a shared
    machine falls on all of them alike rather than on whichever ran at the time."""
    if not frameworks:
        return []
    workers: list[Worker] = []
    for f in frameworks:
        print(f"  {model} {size}x{size}: starting {f} ...", end=" ", flush=True)
        w = Worker(f, model, args, size)
        w.ask(None, "SERVING")
        print((w.result or {}).get("skipped") or "ok", flush=True)
        workers.append(w)
    for kind in args.kinds:
        for w in workers:
            w.ask(f"prepare {kind}", "READY")
        for i in range(args.steps):
            for w in workers[i % len(workers):] + workers[:i % len(workers)]:
                w.ask("time 1", "TIMED")
        print(f"  {model} {kind}: " + ", ".join(
            f"{w.framework} {'failed' if w.result else 'timed'}" for w in workers), flush=True)
    if all(k in args.kinds for k in PAIR):
        # The frozen-step target is a ratio within tljax: its two programs, timed in the
        # phases above minutes apart, are also timed call by call side by side.
        for w in workers:
            if w.framework == "tljax":
                w.ask(f"pair {' '.join(PAIR)} {max(3, args.steps)}", "PAIRED")
    return [w.close() for w in workers]


def img_s(r: dict, kind: str) -> float | None:
    k = r.get(kind)
    return r["batch"] / k["median_s"] if k else None


def add_derived(results: list[dict]) -> None:
    """images/s, and MFU from the tljax worker's FLOPs and matmul peak for the same model."""
    for r in results:
        if "skipped" in r:
            continue
        ref = next((t for t in results if t["framework"] == "tljax"
                    and t["model"] == r["model"] and "skipped" not in t), None)
        for kind in KINDS:
            if kind not in r:
                continue
            r[kind]["images_per_s"] = img_s(r, kind)
            if ref and kind in ref and ref[kind].get("flops") and ref.get("peak_flops"):
                r[kind]["mfu"] = ref[kind]["flops"] / r[kind]["median_s"] / ref["peak_flops"]
            if ref and r is not ref and kind in ref:
                ratio = paired_ratio(ref[kind]["times_s"], r[kind]["times_s"])
                if ratio is not None:
                    r[kind]["tljax_speedup_paired"] = ratio


def paired_ratio(tljax_times: list[float], peer_times: list[float]) -> float | None:
    """tljax's speed over a peer's as the median of per-round ratios: round i timed one call of
    each framework back to back (`run_model`), so both calls of a pair saw the machine at the
    same speed. This machine switches between two speeds for seconds at a time (a fixed numpy
    matmul loop: 70 ms in one spell, 132 ms in the next, with no steal time reported), which
    moves each framework's median with how its calls fell on the spells; a ratio within a round
    does not move with them."""
    if not tljax_times or len(tljax_times) != len(peer_times):
        return None
    return statistics.median(p / t for t, p in zip(tljax_times, peer_times, strict=True))


def print_table(results: list[dict], frameworks: list[str]) -> None:
    ran = [f for f in frameworks if any(r["framework"] == f and "skipped" not in r
                                        for r in results)]
    peers = [f for f in ran if f != "tljax"]
    targets = [p for p in ("torch", "keras-jax") if p in peers]
    w = {f: max(8, len(f) + 2) for f in ran}
    models = list(dict.fromkeys(r["model"] for r in results))
    table = {(r["model"], r["framework"]): r for r in results if "skipped" not in r}

    def cell(model, f, kind, fmt):
        k = table.get((model, f), {}).get(kind)
        return (fmt(k, table[(model, f)]) if k else "-").rjust(w[f])

    print("\nimages/s (median of timed calls); ratios: tljax / peer")
    print(f"{'model':<16}{'kind':<12}" + "".join(f.rjust(w[f]) for f in ran)
          + ("  " + "fastest peer".ljust(17) + "tljax/fastest" if peers else "")
          + "".join(f"  tljax/{p}" for p in targets))
    for model in models:
        for kind in KINDS:
            line = f"{model:<16}{kind:<12}" + "".join(
                cell(model, f, kind, lambda k, r: f"{k['images_per_s']:.2f}") for f in ran)
            ips = {f: table[(model, f)][kind]["images_per_s"] for f in ran
                   if kind in table.get((model, f), {})}
            t = ips.get("tljax")
            if t and peers:
                best = max((p for p in peers if p in ips), key=ips.get, default=None)
                line += ("  " + (best or "-").ljust(17)
                         + (f"{t / ips[best]:.2f}x" if best else "-").rjust(13))
                for p in targets:
                    line += (f"{t / ips[p]:.2f}x" if p in ips else "-").rjust(len(p) + 8)
            print(line)
    if peers:
        print("\ntljax / peer, median of per-round ratios (each round times one call of every "
              "framework back to back, so a slow spell of the machine falls on both calls of a "
              "ratio)")
        print(f"{'model':<16}{'kind':<12}" + "".join(p.rjust(w[p]) for p in peers)
              + "  " + "slowest ratio")
        for model in models:
            for kind in KINDS:
                got = {p: table[(model, p)][kind]["tljax_speedup_paired"] for p in peers
                       if "tljax_speedup_paired" in table.get((model, p), {}).get(kind, {})}
                if got:
                    low = min(got, key=got.get)
                    print(f"{model:<16}{kind:<12}" + "".join(
                        (f"{got[p]:.2f}x" if p in got else "-").rjust(w[p]) for p in peers)
                        + f"  {got[low]:.2f}x ({low})")
    print("\nfirst call s (compilation included)")
    print(f"{'model':<16}{'kind':<12}" + "".join(f.rjust(w[f]) for f in ran))
    for model in models:
        for kind in KINDS:
            print(f"{model:<16}{kind:<12}" + "".join(
                cell(model, f, kind, lambda k, r: f"{k['first_call_s']:.1f}") for f in ran))
    print("\npeak memory MB (CPU: the worker process's peak RSS, cumulative over its programs in "
          "this order; accelerators: per program, tljax's from XLA's memory analysis, PyTorch's "
          "max_memory_allocated)")
    print(f"{'model':<16}{'kind':<12}" + "".join(f.rjust(w[f]) for f in ran))
    for model in models:
        for kind in KINDS:
            print(f"{model:<16}{kind:<12}" + "".join(
                cell(model, f, kind, lambda k, r: f"{k['peak_memory_mb']:.0f}") for f in ran))
    print("\ntljax details")
    for model in models:
        r = table.get((model, "tljax"))
        if not r:
            continue
        print(f"{model:<16}matmul peak {r['peak_flops'] / 1e9:.0f} GFLOP/s"
              + (f", copy bandwidth {r['bandwidth'] / 1e9:.0f} GB/s" if "bandwidth" in r else ""))
        for kind in KINDS:
            k = r.get(kind, {})
            if "mfu" not in k:
                continue
            line = (f"{kind} {k['flops'] / 1e9:.1f} GFLOP, MFU {100 * k['mfu']:.1f}%, "
                    f"XLA memory {k['xla_memory_mb']:.0f} MB")
            if "bytes_accessed" in k and "bandwidth" in r:
                # Roofline floor: the arithmetic at the matmul peak, the XLA byte count at the
                # copy bandwidth; the larger of the two bounds the step from below.
                arith = k["flops"] / r["peak_flops"] * 1e3
                mem = k["bytes_accessed"] / r["bandwidth"] * 1e3
                line += (f"; {k['bytes_accessed'] / 2**30:.1f} GiB moved; floor "
                         f"{max(arith, mem):.1f} ms ({'memory' if mem > arith else 'arithmetic'}"
                         f"; arithmetic {arith:.1f}, memory {mem:.1f}) vs "
                         f"{k['median_s'] * 1e3:.1f} ms measured")
            print(f"{'':<16}{line}")
        paired = r.get("paired", {}).get("frozen_step/inference")
        if paired:
            ratio = paired["median"]
            print(f"{'':<16}frozen-step time / inference time = {ratio:.2f}, median of "
                  f"{len(paired['ratios'])} back-to-back pairs "
                  f"({'meets' if ratio <= 1.25 else 'MISSES'} the 1.25 target)")
        if model == "resnet50" and "full_step" in r:
            c = r["full_step"]["compile_s"]
            print(f"{'':<16}full-step compile (trace + XLA) {c:.1f} s "
                  f"({'meets' if c <= 10 else 'MISSES'} the 10 s target)")
    for r in results:
        if "skipped" in r:
            print(f"skipped {r['framework']} {r['model']}: {r['skipped']}")


def plot(results: list[dict], frameworks: list[str], path: str, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in results))
    ran = [f for f in frameworks if any(r["framework"] == f and "skipped" not in r
                                        for r in results)]
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models, strict=True):
        rows = {r["framework"]: r for r in results if r["model"] == model and "skipped" not in r}
        w = 0.8 / max(1, len(ran))
        for i, f in enumerate(ran):
            ys = [rows[f][k]["images_per_s"] if f in rows and k in rows[f] else 0 for k in KINDS]
            ax.bar([j + i * w for j in range(len(KINDS))], ys, w, label=f)
        ax.set_xticks([j + w * (len(ran) - 1) / 2 for j in range(len(KINDS))], KINDS)
        ax.set_yscale("log")
        ax.set_title(model)
        ax.set_ylabel("images/s (log)")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title or f"{platform.node() or 'this machine'}: {os.cpu_count()} CPU cores")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help=f"{', '.join(QUICK['models'])} at {QUICK['size']}x{QUICK['size']} with "
                   f"{', '.join(QUICK['frameworks'])}, {QUICK['steps']} timed steps (the "
                   "targets' peers; about 3 minutes on 2 CPU cores)")
    p.add_argument("--models", nargs="+", choices=sorted(MODELS))
    p.add_argument("--frameworks", nargs="+", choices=FRAMEWORKS)
    p.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS))
    p.add_argument("--batch", type=int, default=0, help="0: 16 on CPU, 256 on an accelerator")
    p.add_argument("--size", type=int, default=0, help="0: each model's native size")
    p.add_argument("--steps", type=int, default=0, help="timed calls per figure (0: 5)")
    p.add_argument("--warmup", type=int, default=0, help="untimed calls first (0: 2)")
    p.add_argument("--classes", type=int, default=10, help="classes of the new head")
    p.add_argument("--dtype", choices=DTYPES, default="auto",
                   help="computation dtype (parameters stay float32); auto: float32 on CPU, "
                   "bfloat16 on an accelerator")
    p.add_argument("--timeout", type=int, default=1800, help="seconds per worker process")
    p.add_argument("--peer-malloc", choices=["same", "default"], default="same",
                   help="same: the peers run under the host-memory policy tljax sets for itself "
                   "(glibc keeps freed memory); default: glibc's defaults for the peers")
    p.add_argument("--json", help="write every figure to this JSON file")
    p.add_argument("--logs", help="write each worker's output to DIR/FRAMEWORK_MODEL.log")
    p.add_argument("--plot", default="benchmark.png", help="bar chart PNG ('' for none)")
    args = p.parse_args(argv)
    q = QUICK if args.quick else {}
    args.models = args.models or q.get("models") or list(MODELS)
    frameworks = args.frameworks or q.get("frameworks") or list(FRAMEWORKS)
    args.steps = args.steps or q.get("steps", 5)
    args.warmup = args.warmup or q.get("warmup", 2)
    # The backend, and the CPU's instruction set, which decides tljax's kernels (a CPU with
    # AVX-512 cannot stand in for one without: docs/benchmarks.md, "Per instruction set").
    probe = subprocess.run([sys.executable, "-c", "import jax; from tljax.native import build; "
                            "print(jax.default_backend(), build.cpu_isa())"],
                           capture_output=True, text=True, env=worker_env()).stdout.split()
    accel, isa = probe[-2:] if len(probe) >= 2 else ("", "unknown")
    args.batch = args.batch or (16 if accel in ("cpu", "") else 256)
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
          f"instruction set {isa}, JAX backend {accel or '?'}; batch {args.batch}, "
          f"{args.steps} timed calls after {args.warmup} untimed", flush=True)
    results = []
    t0 = time.time()
    for model in args.models:
        size = args.size or q.get("size") or MODELS[model]
        runnable = []
        for f in frameworks:
            why = installed(f)
            if why is None and accel not in ("cpu", "") and f.startswith("keras"):
                why = "Keras peers are run on CPU machines only"
            if why:
                results.append({"framework": f, "model": model, "skipped": why})
                continue
            runnable.append(f)
        results += run_model(model, runnable, args, size)
    add_derived(results)
    print_table(results, frameworks)
    print(f"\nwhole benchmark: {(time.time() - t0) / 60:.1f} min")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"batch": args.batch, "cpu_cores": os.cpu_count(), "backend": accel,
                       "cpu_isa": isa,
                       "peer_malloc": args.peer_malloc,
                       "command": " ".join(sys.argv), "results": results}, f, indent=2)
    if args.plot:
        plot(results, frameworks, args.plot, f"{platform.node() or 'this machine'}: "
             f"{os.cpu_count()} CPU cores, {isa}")
        print(f"plot: {os.path.abspath(args.plot)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
