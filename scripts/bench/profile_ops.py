"""Where a tljax program's time goes: a per-op profile of one benchmark program.

    python scripts/bench/profile_ops.py --model resnet50 --size 112 --kind full_step

Builds the program exactly as the benchmark worker does (`run_tljax.program`: the jitted forward
pass, or the train step compiled by `parallel.compile_train_step`), runs it under
`jax.profiler.trace` with XLA:CPU's per-op trace events on, and sums each top-level operation's
time over the traced calls. Each operation is named by the JAX source of its HLO metadata
(`op_name`): forward or backward (`transpose(...)`), the layer (`stage1/block1/conv2`) and the
primitive, and grouped by layer kind (`conv`, `bn`, `dwconv`, ... with digits dropped) and
primitive. A convolution or matrix product in the backward pass is a kernel gradient when its
output has no batch dimension, else an input gradient.

Prints the groups by time, then the `--top` single operations, and the host's time between
one call's last op and the next call's first (argument parsing, output arrays: for a train
step, a cost per leaf of the state). On CPU the per-op events need
XLA's `xla_cpu_enable_xprof_traceme` option, which this script sets in `XLA_FLAGS` before JAX
starts (it adds a little time to each op; the total is printed beside the untraced time).
"""

from __future__ import annotations

import argparse
import bisect
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_cpu_enable_xprof_traceme=true").strip()
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import run_tljax  # noqa: E402

_INSTR = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (\S+?)(?:\{[^}]*\})? ([\w\-]+)\(")
_OP_NAME = re.compile(r'op_name="([^"]*)"')


def instructions(hlo: str) -> dict[str, tuple[str, str, str]]:
    """`name -> (opcode, output shape, op_name)` for the entry computation's instructions."""
    entry = hlo[hlo.index("\nENTRY "):]
    out = {}
    for line in entry.splitlines()[1:]:
        m = _INSTR.match(line)
        if m:
            op = _OP_NAME.search(line)
            out[m.group(1)] = (m.group(3), m.group(2), op.group(1) if op else "")
    return out


def describe(opcode: str, shape: str, op_name: str, batch: int) -> tuple[str, str]:
    """(group, pass) of one operation from its metadata; see the module docstring."""
    backward = "transpose(" in op_name
    parts = [p for p in op_name.split("/")
             if p and not p.startswith(("jit(", "jvp(", "transpose("))]
    primitive = parts[-1] if parts else opcode
    # flax names a helper method's scope "conv3._convolve" inside "conv3": not a layer.
    layers = [re.sub(r"\d+[a-z]?$", "", p) for p in parts[:-1]
              if not p.startswith(("pjit", "checkpoint", "custom_vjp", "remat")) and "._" not in p]
    layer = layers[-1] if layers else "-"
    if primitive in ("conv_general_dilated", "dot_general") and backward:
        dims = re.findall(r"\d+", shape.split("{")[0])
        primitive += " (input grad)" if dims and int(dims[0]) == batch else " (kernel grad)"
    return f"{layer}: {primitive}", "backward" if backward else "forward"


# Trace events that start a call of a compiled program (JAX's dispatch, then the PjRt client's
# execution), before its first op: a gap between two ops in which one starts is host time
# between calls (argument parsing, output arrays), not an op's.
CALL_EVENTS = ("PjitFunction(", "CommonPjRtLoadedExecutable::Execute")
BETWEEN_CALLS = "(between calls)"


def attribute(events: list, ops: dict, calls: int) -> collections.Counter:
    """Milliseconds per call of each entry op: its own trace event, plus the idle time on the
    op timeline (no op event running) that follows it within the same call. XLA:CPU runs
    convolutions (Eigen) asynchronously in its thread pool: their trace event covers only the
    launch, and the compute shows as a gap before the next op starts, so the gap is charged to
    the op that ended last before it. A gap in which a call starts (`CALL_EVENTS`) is the
    host's time between calls (dispatch, argument parsing, output arrays) and is counted as
    `BETWEEN_CALLS` (gaps of 100 ms or more not at all)."""
    spans = sorted((e["ts"], e["ts"] + e.get("dur", 0.0), e["name"]) for e in events
                   if e.get("ph") == "X" and e.get("name") in ops)
    call_starts = sorted(e["ts"] for e in events
                         if e.get("ph") == "X" and e.get("name", "").startswith(CALL_EVENTS))
    per_op: collections.Counter = collections.Counter()
    last_end, last_name = None, None
    for start, end, name in spans:
        if last_end is not None and start > last_end and start - last_end < 1e5:  # < 100 ms
            # A call began between the two ops: the gap is host time between calls.
            new_call = bisect.bisect_right(call_starts, start) > bisect.bisect_right(
                call_starts, last_end)
            per_op[BETWEEN_CALLS if new_call else last_name] += start - last_end
        per_op[name] += end - start
        if last_end is None or end > last_end:
            last_end, last_name = end, name
    return collections.Counter({k: v / 1e3 / calls for k, v in per_op.items()})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet50")
    p.add_argument("--size", type=int, default=112)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--kind", choices=("inference", "full_step", "frozen_step"),
                   default="full_step")
    p.add_argument("--calls", type=int, default=2, help="traced calls (times are per call)")
    p.add_argument("--top", type=int, default=25, help="single operations listed")
    p.add_argument("--groups", type=int, default=30, help="groups listed")
    p.add_argument("--trace-dir", default=None, help="keep the trace here (default: a temp dir)")
    args = p.parse_args()

    module, variables, images, labels = run_tljax.setup(args.model, args.size, args.batch, 10)
    once, info, lower = run_tljax.program(args.kind, module, variables, images, labels,
                                          jax.devices()[0])
    ops = instructions(lower().compile().as_text())
    for _ in range(2):
        jax.block_until_ready(once())
    t = time.perf_counter()
    for _ in range(args.calls):
        jax.block_until_ready(once())
    untraced = (time.perf_counter() - t) / args.calls

    trace_dir = args.trace_dir or tempfile.mkdtemp(prefix="tljax-profile-")
    t = time.perf_counter()
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
        for _ in range(args.calls):
            jax.block_until_ready(once())
    traced = (time.perf_counter() - t) / args.calls
    files = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)
    if not files:
        sys.exit(f"profile: no trace file under {trace_dir}")
    with gzip.open(max(files, key=os.path.getmtime)) as f:
        events = json.load(f)
    events = events["traceEvents"] if isinstance(events, dict) else events

    per_op = attribute(events, ops, args.calls)
    groups: collections.Counter = collections.Counter()
    passes: collections.Counter = collections.Counter()
    between = per_op.pop(BETWEEN_CALLS, 0.0)
    for name, ms in per_op.items():
        group, pass_ = describe(*ops[name], args.batch)
        groups[(pass_, group)] += ms
        passes[pass_] += ms
    total = sum(per_op.values())
    print(f"{args.model} {args.kind} {args.size}x{args.size} batch {args.batch} on "
          f"{jax.devices()[0].device_kind}: {untraced * 1e3:.0f} ms per call untraced, "
          f"{traced * 1e3:.0f} traced, of which {total:.0f} ms charged to ops (forward "
          f"{passes['forward']:.0f}, backward {passes['backward']:.0f}); {len(per_op)} ops; "
          f"{between:.1f} ms between the last op of a call and the first of the next (the "
          f"host's dispatch: arguments, outputs)")
    print(f"\n{'ms/call':>8} {'share':>6}  pass      group")
    for (pass_, group), ms in groups.most_common(args.groups):
        print(f"{ms:8.1f} {ms / total:6.1%}  {pass_:9} {group}")
    print(f"\n{'ms/call':>8}  op (opcode, shape): JAX source")
    for name, ms in per_op.most_common(args.top):
        opcode, shape, op_name = ops[name]
        print(f"{ms:8.1f}  {name} ({opcode}, {shape}): {op_name}")
    if not args.trace_dir:
        print(f"\ntrace: {trace_dir} (open the .trace.json.gz in Perfetto)")


if __name__ == "__main__":
    main()
