"""The value of transfer, measured: the README's main command beside scratch, a linear probe
and the two-phase recipe.

    python scripts/benchmark_transfer.py [--config configs/finetune.py] [--out runs/benchmark]

Runs `python -m tljax.train` in fresh workdirs, one after the other on this machine: the
embedded default (EfficientNet-Lite0 with its ImageNet weights, fine-tuned on `digits`), the
same config with `init=scratch`, with `freeze=backbone` (the linear probe, its own steps
and optimizer) and with `recipe=two_phase` (that probe, then the fine-tune), and prints wall
time and test top-1/top-5 side by side with the
targets (pretrained: top-1 >= 0.97 in under 10 minutes on 2 CPU cores; a clear margin over
scratch). Each run starts with an empty cache (no compiled programs, the bundled Lite0 file
converted again), as on a fresh machine; `--warm` reuses $TLJAX_CACHE. `--json PATH` writes
the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(config: str, workdir: str, warm: bool) -> dict:
    if os.path.exists(workdir):
        shutil.rmtree(workdir)
    env = dict(os.environ)
    if not warm:  # as on a fresh machine: no compiled programs, no converted weights
        env["TLJAX_CACHE"] = tempfile.mkdtemp(prefix="tljax_cold_cache_")
    t = time.time()
    out = subprocess.run([sys.executable, "-m", "tljax.train", f"--config={config}",
                          f"--workdir={workdir}"], cwd=ROOT, capture_output=True, text=True,
                         env=env)
    wall = time.time() - t
    if out.returncode != 0:
        sys.stderr.write(out.stdout[-3000:] + out.stderr[-5000:])
        raise SystemExit(f"{config} failed with status {out.returncode}")
    with open(os.path.join(workdir, "summary.json")) as f:
        summary = json.load(f)
    summary["command_seconds"] = round(wall, 1)  # including Python, TF and JAX start-up
    return summary


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/finetune.py")
    parser.add_argument("--out", default="runs/benchmark_transfer")
    parser.add_argument("--json", default="", help="write the figures to this file")
    parser.add_argument("--warm", action="store_true", help="reuse $TLJAX_CACHE (compiled "
                        "programs, converted weights); by default each run starts cold")
    args = parser.parse_args(argv)
    cores = os.cpu_count()
    rows = []
    joined = "," if ":" in args.config else ":"
    for key, name, config in (
            ("pretrained", "pretrained (ImageNet)", args.config),
            ("scratch", "scratch", args.config + joined + "init=scratch"),
            ("probe", "linear probe (ImageNet)", args.config + joined + "freeze=backbone"),
            ("two_phase", "two-phase (ImageNet)", args.config + joined + "recipe=two_phase")):
        print(f"running {name}: python -m tljax.train --config={config} ...", flush=True)
        rows.append((name, run(config, os.path.join(args.out, key), args.warm)))
    print(f"\n{rows[0][1]['model']} on {rows[0][1]['dataset']}, {cores} CPU cores")
    print(f"validation: {rows[0][1]['selection_split']}, test: {rows[0][1]['test_split']} "
          f"(the final checkpoint; 'selected': the best on validation)")
    print(f"{'init':<24} {'steps':>6} {'wall (command)':>15} {'val top-1':>10} "
          f"{'test top-1':>11} {'test top-5':>11} {'selected: step, test top-1':>27}")
    for name, s in rows:
        final, sel = s["final"], s["selected"]
        print(f"{name:<24} {s['steps']:>6} {s['command_seconds'] / 60:>12.1f} min "
              f"{final['validation']['top1']:>10.4f} {final['test']['top1']:>11.4f} "
              f"{final['test']['top5']:>11.4f} {sel['step']:>18} {sel['test']['top1']:>8.4f}")
    for name, s in rows:
        for phase, p in s.get("phases", {}).items():
            print(f"  {name}: after {phase} ({p['end_step']} steps) validation top-1 "
                  f"{p['top1']:.4f}")
    pre, scratch, probe, two_phase = (s for _, s in rows)
    test = {k: s["final"]["test"]["top1"] for k, s in (("pre", pre), ("scratch", scratch))}
    ok_acc = test["pre"] >= 0.97
    ok_time = pre["command_seconds"] < 600
    print(f"\ntarget test top-1 >= 0.97: {'met' if ok_acc else 'NOT met'} ({test['pre']:.4f}); "
          f"target < 10 min: {'met' if ok_time else 'NOT met'} "
          f"({pre['command_seconds'] / 60:.1f} min); margin over scratch: "
          f"{test['pre'] - test['scratch']:+.4f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cores": cores, "pretrained": pre, "scratch": scratch, "probe": probe,
                       "two_phase": two_phase}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
