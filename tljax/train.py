r"""Fine-tune a model: `python -m tljax.train --config CONFIG[:ARGS] --workdir DIR`.

  python -m tljax.train --config configs/finetune.py --workdir runs/digits_lite0
  python -m tljax.train --config configs/finetune.py:model=resnet50,dataset=tf_flowers,\
freeze=backbone --workdir runs/flowers --config.optimizer.learning_rate=0.05

The config file documents every field (configs/finetune.py); `--config.FIELD=VALUE` overrides
one. Without `--config`, or with `--config=finetune:ARGS`, the run takes that config as it
ships inside the package (`tljax.configs`): what a `pip install tljax` has.
What the run writes in the workdir:
  config.json      the resolved config;  run.json: versions, git commit, devices, processes
  model.json       the model, its options, input size, preprocessing and class names
  checkpoints/     Orbax checkpoints: the last `keep_checkpoints` and the best by validation
                   top-1 (of the parameters `config.select_on` names: raw or their average)
  metrics.jsonl    one JSON record per log/eval step;  tensorboard/: the same as event files
  curves.png       training and evaluation curves, drawn at the end
Use the result with `python -m tljax.predict --weights DIR IMAGE...`, `tljax.models.load(DIR)`,
or export it for sharing: `python -m tljax.export DIR OUT`.
Started again with the same workdir, a run resumes from its latest checkpoint and ends with
exactly the parameters of an uninterrupted run. SIGTERM (preemption) saves a checkpoint and
exits with status 143; rerun the same command to continue.

Several hosts (a TPU pod slice, GPU machines): one process per host, each started with the same
command and using all its local devices; pass `--distributed` so that every process calls
`jax.distributed.initialize()` first (on Cloud TPU and under SLURM it finds its peers by itself;
elsewhere add --coordinator_address=HOST:PORT --num_processes=N --process_id=I). The global batch
is split over all devices of all hosts, each host reads its own part of the data, and the step
is the data-parallel step of `tljax.parallel` (tested on one process against two).
"""

from __future__ import annotations

if __name__ == "__main__":  # the program's allocator policy, before any thread allocates
    from tljax import host_memory

    host_memory.keep_freed_memory()

import json
import logging
import os
import signal
import sys
import time

import numpy as np

from tljax import run

log = logging.getLogger("tljax.train")

PREEMPTED_EXIT = 143  # 128 + SIGTERM
PREFIX = {"raw": "eval/", "ema": "eval_ema/"}  # each kind of parameters' evaluation metrics


class _Stop:
    """SIGTERM -> a flag the loop checks after each step. With several processes the flag is
    shared (one process may be signalled before the others) at steps that are multiples of
    `every`, so that a step is not a collective wait on every host."""

    def __init__(self):
        self.requested = False
        self._old = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        log.warning("SIGTERM: saving a checkpoint after this step (with several processes: "
                    "at the next shared check), then exiting")
        self.requested = True

    def now(self, step: int, every: int) -> bool:
        import jax

        if jax.process_count() == 1:
            return self.requested
        if step % every:
            return False
        from jax.experimental import multihost_utils

        flags = multihost_utils.process_allgather(np.asarray(self.requested, np.int32))
        return bool(np.any(flags))

    def restore(self):
        signal.signal(signal.SIGTERM, self._old)


def train_and_evaluate(config, workdir: str) -> dict:
    """Train as `config` says, writing to `workdir`; returns the final summary (also written to
    `WORKDIR/summary.json`). Resumes from the workdir's latest checkpoint if there is one."""
    t_start = time.time()
    stop = _Stop()  # from the start: a SIGTERM while setting up stops after the first step
    try:
        return _train_and_evaluate(config, workdir, stop, t_start)
    finally:
        stop.restore()


def _train_and_evaluate(config, workdir: str, stop: _Stop, t_start: float) -> dict:
    import jax
    from tqdm import tqdm

    from tljax import (
        checkpoint,
        datasets,
        feature_cache,
        freeze,
        metrics,
        parallel,
        storage,
        trained,
    )
    from tljax import train_step as steps
    from tljax.models import preprocessing, registry

    workdir = storage.absolute(workdir)
    primary = jax.process_index() == 0
    if config.compilation_cache:  # this host's own: compiled programs are per machine
        jax.config.update("jax_compilation_cache_dir",
                          os.path.join(storage.local_cache(), "xla"))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)

    r = run.resolve(config)
    c = r.config
    record = run.config_record(r)
    storage.makedirs(workdir)
    changed = run.check_workdir(workdir, record)
    plan = run.phases(c)
    total = plan[-1].end
    ckpts = checkpoint.Checkpoints(storage.join(workdir, "checkpoints"), c.keep_checkpoints)
    start = ckpts.latest_step() or 0
    if start > total:
        ckpts.close()
        raise run.RunError(
            f"{workdir} has a checkpoint at step {start}, past this config's {total} steps: "
            f"evaluate it with `python -m tljax.evaluate --workdir {workdir}`, train on with "
            f"more steps, or use a new --workdir")
    if primary:
        storage.write_text(storage.join(workdir, "config.json"),
                           json.dumps(record, indent=2, sort_keys=True))
        storage.write_text(storage.join(workdir, "run.json"),
                           json.dumps(run.run_history(workdir, changed), indent=2))
        # What the checkpoints are a model of, for predict, export and models.load.
        storage.write_text(storage.join(workdir, trained.RECORD),
                           json.dumps(trained.model_record(r), indent=2))

    devices = jax.device_count()
    local_batch = parallel.check_batch(c.batch_size, devices) * jax.local_device_count()
    eval_global = c.eval_batch_size or c.batch_size
    local_eval = parallel.check_batch(eval_global, devices) * jax.local_device_count()
    test = (f"test {r.test_split} ({r.source.num_examples(r.test_split)}, at the end)"
            if r.test_split else "no test split")
    log.info("%s on %s: %d classes, %dx%d, train %s (%d), validation %s (%d), %s; %d device(s) "
             "in %d process(es), global batch %d", c.model, r.source.name, r.num_classes,
             r.image_size, r.image_size, r.train_split, r.source.num_examples(r.train_split),
             r.validation_split, r.source.num_examples(r.validation_split), test, devices,
             jax.process_count(), c.batch_size)

    model = run.build_model(r)
    variables = run.initial_variables(r, model)
    family = registry.family(c.model)
    prep = preprocessing.FUNCTIONS[registry.spec(c.model).numerics.preprocessing]
    all_labels = [freeze.resolve(variables["params"], p.freeze, family) for p in plan]
    _check_carry(plan, all_labels, variables["params"])
    mesh = parallel.mesh()
    writer = metrics.Writer(workdir, enabled=primary, resume_step=start)
    pi, pc = jax.process_index(), jax.process_count()

    budget = datasets.budget(c.data_cache_gb)
    train_recs = r.source.records(r.train_split, budget)
    eval_recs = r.source.records(r.validation_split, max(budget - train_recs.held, 0))
    train_name = f"{r.source.name} [{r.train_split}]"
    eval_name = f"{r.source.name} [{r.validation_split}]"
    cache: dict = {}

    def cached_features():
        """Train and eval features of the frozen backbone, computed once per process."""
        if not cache:
            feats_of = feature_cache.jit_features(model, variables, prep)
            log.info("linear probing on cached features: computing them once (frozen "
                     "backbone)")
            with _timer("features"):
                src = datasets.eval_batches(train_recs, local_eval, r.image_size, c.eval_crop,
                                            pi, pc, train_name)[0]
                cache["train"] = feature_cache.compute(feats_of, src)
                src, cache["count"] = datasets.eval_batches(
                    eval_recs, local_eval, r.image_size, c.eval_crop, pi, pc, eval_name)
                cache["eval"] = feature_cache.compute(feats_of, src)
        return cache

    def step_functions(phase, labels, tx, trained_so_far):
        config = steps.StepConfig(
            model=feature_cache.head_of(model) if phase.cached else model, tx=tx,
            trainable=freeze.trainable(labels),
            frozen_bn=freeze.frozen_batchnorm(labels, variables.get("batch_stats", {}), family,
                                              everywhere=phase.bn_inference),
            sync_bn=c.sync_bn, preprocess=None if phase.cached else prep,
            on_features=phase.cached, bn_momentum=c.bn_momentum,
            label_smoothing=c.label_smoothing, ema_decay=c.ema_decay, ema_warmup=c.ema_warmup,
            ema_paths=trained_so_far)
        return (parallel.shard_map_train_step(config, mesh),
                parallel.shard_map_eval_step(config, mesh))

    def train_stream(phase, step):
        if phase.cached:
            return feature_cache.train_batches(*cached_features()["train"], local_batch,
                                               c.seed, step)
        augment = datasets.Augment(tuple(c.augment.crop_area) or None, flip=c.augment.flip)
        rows = parallel.process_rows(mesh, c.batch_size)
        assert rows[1] - rows[0] == local_batch, (rows, local_batch)
        return datasets.train_batches(train_recs, local_batch, c.batch_size, r.image_size,
                                      c.seed, augment, step, pi, train_name, rows[0])

    def evaluate(phase, eval_fn, state) -> dict:
        if phase.cached:
            f = cached_features()
            stream = feature_cache.eval_batches(*f["eval"], local_eval, f["count"])
        else:
            stream = datasets.eval_batches(eval_recs, local_eval, r.image_size, c.eval_crop,
                                           pi, pc, eval_name)[0]
        light = state.replace(opt_state=(), ema_params=None)  # what evaluating reads
        states = {"eval/": light}
        if state.ema_params is not None:  # the moving average, on the same batches
            states["eval_ema/"] = light.replace(params=state.ema_params)
        results = run_evals(eval_fn, list(states.values()), stream, mesh)
        return {prefix + k: m[k] for prefix, m in zip(states, results, strict=True)
                for k in ("loss", "top1", "top5")}

    rng = jax.random.key(c.seed)
    bar = tqdm(total=total, initial=start, desc="train", unit="step", disable=not primary,
               dynamic_ncols=True)
    last_eval: dict = {}
    state = None
    step = start
    preempted = False
    try:
        for i in range(run.phase_of(plan, start), len(plan)):
            phase, labels = plan[i], all_labels[i]
            if phase.name:
                log.info("phase %r: steps %d-%d, freeze=%s, %s at %g%s", phase.name,
                         phase.start + 1, phase.end, phase.freeze, phase.optimizer.name,
                         phase.optimizer.learning_rate, ", on cached features"
                         if phase.cached else "")
            freeze.log_table(labels, variables["params"])
            tx, schedule = run.optimizer(phase, labels)
            if state is None:  # the run's start, or the phase its latest checkpoint is of
                state = parallel.put_replicated(
                    steps.create_state(variables, tx, ema=c.ema_decay is not None), mesh)
                if start:
                    log.info("resuming from %s/%d", ckpts.directory, start)
                    state = ckpts.restore(start, state)
            elif phase.optimizer_state == "reset":
                replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
                state = state.replace(opt_state=jax.jit(tx.init, out_shardings=replicated)(
                    state.params))
            trained_so_far = frozenset().union(*(freeze.trainable(x) for x in all_labels[:i + 1]))
            train_fn, eval_fn = step_functions(phase, labels, tx, trained_so_far)
            final = (phase, eval_fn)
            if step >= phase.end:  # resumed at this phase's last step: on to the next
                continue
            batches = train_stream(phase, step)
            pending, t_log, images, waited = [], time.time(), 0, 0.0
            while step < phase.end:
                t_wait = time.time()
                host_batch = next(batches)
                waited += time.time() - t_wait
                state, m = train_fn(state, parallel.put_batch(host_batch, mesh), rng)
                step += 1
                pending.append(m)
                images += c.batch_size
                bar.update(1)
                if step % c.log_every == 0 or step == phase.end:
                    ms = jax.tree.map(lambda *xs: float(np.mean([float(x) for x in xs])),
                                      *pending)
                    elapsed = time.time() - t_log
                    scalars = {"train/loss": ms["loss"], "train/accuracy": ms["accuracy"],
                               "learning_rate": float(schedule(step - 1 - phase.start)),
                               "images_per_second": images / max(elapsed, 1e-9),
                               "input_wait": min(waited / max(elapsed, 1e-9), 1.0)}
                    writer.write(step, scalars)
                    bar.set_postfix(loss=f"{ms['loss']:.3f}", acc=f"{ms['accuracy']:.3f}",
                                    input_wait=f"{scalars['input_wait']:.0%}")
                    pending, t_log, images, waited = [], time.time(), 0, 0.0
                evaluated = step % c.eval_every == 0 or step == phase.end
                if evaluated:
                    t_eval = time.time()
                    last_eval = evaluate(phase, eval_fn, state)
                    t_log += time.time() - t_eval  # images/s counts training time only
                    writer.write(step, last_eval)
                    if primary:  # (tqdm.write prints whether or not the bar is shown)
                        bar.write(f"step {step}: validation " + _eval_line(last_eval))
                if step % c.checkpoint_every == 0 or step == phase.end or evaluated:
                    ckpts.save(step, state, _best(last_eval, r.select) if evaluated else None)
                if stop.now(step, 1 if step == phase.end else c.log_every):
                    ckpts.save(step, state)
                    preempted = True
                    break
            if preempted:
                break
            if phase.cached and not any(p.cached for p in plan[i + 1:]):
                cache.clear()  # the features of a large dataset take gigabytes of host memory
    finally:
        bar.close()
        ckpts.close()
        writer.close()
    if preempted or stop.now(step, 1):  # (the test evaluation below takes a while)
        log.warning("stopped at step %d of %d by SIGTERM; checkpoint saved. Run the same "
                    "command to resume.", step, total)
        return {"preempted": True, "step": step}

    if not last_eval:  # resumed a finished run: evaluate what it ended with
        last_eval = evaluate(*final, state)
    train_recs = eval_recs = state = None  # the test split below gets the memory budget
    cache.clear()
    best = ckpts.best_step() or total
    freezes = [p.freeze if isinstance(p.freeze, str) else "custom" for p in plan]
    # The figures are those of the parameters the run selects on (`config.select_on`).
    prefix = PREFIX[r.select]
    summary = {
        "model": c.model, "dataset": r.source.name, "init": c.init, "freeze": freezes[0],
        "recipe": ", then ".join(f"freeze={f} for {p.steps} steps"
                                 for f, p in zip(freezes, plan, strict=True)),
        "steps": total, "params": r.select,
        # The final checkpoint on the validation split (what the run logged last).
        "top1": last_eval[prefix + "top1"], "top5": last_eval[prefix + "top5"],
        "selection_split": r.validation_split, "test_split": r.test_split,
        "best_step": best,
        "final": {"step": total, "validation": _scores(last_eval, prefix)},
        "selected": {"step": best},
        "wall_seconds": None, "workdir": workdir,
    }
    other = {"ema": "raw", "raw": "ema"}[r.select] if c.ema_decay is not None else None
    if other:  # the final checkpoint's other parameters, for comparison
        summary["final"][other] = {"validation": _scores(
            last_eval, PREFIX[other])}
    if primary:
        logged = {m["step"]: m for m in metrics.read(workdir) if prefix + "top1" in m}
        if best in logged:
            summary["selected"]["validation"] = _scores(logged[best], prefix)
    if r.test_split:  # once, at the end: the final checkpoint and the one selected on validation
        from tljax.evaluate import evaluate_many

        wanted = [(str(total), r.select), (str(best), r.select)]
        if other:
            wanted.append((str(total), other))
        once = list(dict.fromkeys(wanted))
        tested = {k: _scores(m, "") for k, m in zip(
            once, evaluate_many(workdir, once, r.test_split, c.eval_batch_size), strict=True)}
        summary["final"]["test"] = tested[wanted[0]]
        summary["selected"]["test"] = tested[wanted[1]]
        if other:
            summary["final"][other]["test"] = tested[wanted[2]]
    summary["wall_seconds"] = round(time.time() - t_start, 1)
    if primary:
        if len(plan) > 1:  # each phase's last evaluation (also from before a resume)
            ends = {p.end: p.name for p in plan}
            summary["phases"] = {
                ends[m["step"]]: {"end_step": m["step"], "top1": m[prefix + "top1"]}
                for m in metrics.read(workdir) if m.get("step") in ends and prefix + "top1" in m}
        summary["plot"] = metrics.plot(workdir, f"{c.model} on {r.source.name} ({c.init}, "
                                       f"{summary['recipe']})", [p.end for p in plan[:-1]])
        storage.write_text(storage.join(workdir, "summary.json"), json.dumps(summary, indent=2))
    return summary


def _scores(m: dict, prefix: str) -> dict:
    return {k: m[prefix + k] for k in ("top1", "top5", "loss")}


def describe(summary: dict) -> str:
    """The summary line: which number is which split, of which checkpoint."""
    final, selected = summary["final"], summary["selected"]
    kind = {"ema": "moving average of the parameters", "raw": "parameters"}
    params = summary.get("params", "raw")
    text = (f"{summary['model']} on {summary['dataset']} ({summary['init']}, "
            f"{summary['recipe']}), {summary['steps']} steps in "
            f"{summary['wall_seconds'] / 60:.1f} min"
            + (f", figures of the {kind[params]}" if "ema" in final or params == "ema" else "")
            + f": validation ({summary['selection_split']}) top-1 "
            f"{final['validation']['top1']:.4f}")
    if "test" in final:
        text += f", test ({summary['test_split']}) top-1 {final['test']['top1']:.4f}"
    other = next((k for k in ("raw", "ema") if k in final), None)
    if other:
        o = final[other]
        text += (f" ({kind[other]}: validation top-1 {o['validation']['top1']:.4f}"
                 + (f", test {o['test']['top1']:.4f}" if "test" in o else "") + ")")
    if selected["step"] != final["step"]:
        text += f"; selected on validation, step {selected['step']}"
        if "validation" in selected:
            text += f": validation top-1 {selected['validation']['top1']:.4f}"
        if "test" in selected:
            text += f", test top-1 {selected['test']['top1']:.4f}"
    text += "".join(f"; after {name} ({p['end_step']} steps) validation top-1 {p['top1']:.4f}"
                    for name, p in summary.get("phases", {}).items())
    return text + (f"; curves: {summary['plot']}" if "plot" in summary else "")


def _check_carry(plan, all_labels, params) -> None:
    """A phase that carries the optimizer state needs the same groups and optimizer as the
    phase before; checked before anything trains."""
    import jax

    from tljax import run

    for i in range(1, len(plan)):
        if plan[i].optimizer_state != "carry":
            continue
        before, now = (run.optimizer(plan[j], all_labels[j])[0] for j in (i - 1, i))
        if (all_labels[i] != all_labels[i - 1] or jax.tree.structure(
                jax.eval_shape(before.init, params)) != jax.tree.structure(
                jax.eval_shape(now.init, params))):
            raise run.RunError(
                f"config.finetune.optimizer_state='carry' needs the same parameters to train "
                f"with the same optimizer in both phases (freeze {plan[i - 1].freeze!r} with "
                f"{plan[i - 1].optimizer.name}, then {plan[i].freeze!r} with "
                f"{plan[i].optimizer.name}); use 'reset'")


def _best(ev: dict, select: str) -> dict:
    """A checkpoint's metrics: `top1` (what the best checkpoint is chosen by), `top5` and
    `loss` of the selected parameters, and, with a moving average, those of both kinds."""
    out = {k: ev[PREFIX[select] + k] for k in ("top1", "top5", "loss")}
    if "eval_ema/top1" in ev:
        out.update({f"{kind}_{k}": ev[p + k] for kind, p in PREFIX.items()
                    for k in ("top1", "top5", "loss")})
    return out


def _eval_line(ev: dict) -> str:
    text = (f"top-1 {ev['eval/top1']:.4f}, top-5 {ev['eval/top5']:.4f}, loss "
            f"{ev['eval/loss']:.4f}")
    if "eval_ema/top1" in ev:
        text += (f"; moving average: top-1 {ev['eval_ema/top1']:.4f}, top-5 "
                 f"{ev['eval_ema/top5']:.4f}, loss {ev['eval_ema/loss']:.4f}")
    return text


def run_evals(eval_fn, states: list, batches, mesh) -> list[dict]:
    """Mean loss, top-1 and top-5 (and the example count) of `eval_fn`
    (`parallel.shard_map_eval_step`) over `batches` for each of `states` (parameters of one
    model), reading the batches once."""
    import jax

    from tljax import parallel

    sums = None
    for b in batches:
        out = eval_fn(states, parallel.put_batch(b, mesh))
        sums = out if sums is None else jax.tree.map(lambda a, b: a + b, sums, out)
    results = []
    for s in sums:
        s = jax.tree.map(float, s)
        n = max(s["count"], 1.0)
        results.append({"loss": s["loss"] / n, "top1": s["top1"] / n, "top5": s["top5"] / n,
                        "count": s["count"]})
    return results


class _timer:
    def __init__(self, what: str):
        self.what = what

    def __enter__(self):
        self.t = time.time()

    def __exit__(self, *exc):
        if exc[0] is None:
            log.info("%s: %.1f s", self.what, time.time() - self.t)


# --------------------------------------------------------------------------- command line


def main(argv=None) -> int:
    from absl import app, flags
    from ml_collections import config_flags

    flags_ = flags.FLAGS
    argv = _packaged_config(list(sys.argv if argv is None else argv))
    config_flags.DEFINE_config_file(
        "config", _config_path("finetune"), "config file and its argument: "
        "configs/finetune.py:model=resnet50,dataset=tf_flowers (see the file for every "
        "field); `finetune:ARGS` names the config that ships with tljax (the default); "
        "override a field with --config.FIELD=VALUE", lock_config=True)
    flags.DEFINE_string("workdir", None, "directory for checkpoints, metrics and plots; an "
                        "existing one is resumed")
    flags.DEFINE_bool("distributed", False, "call jax.distributed.initialize() first (one "
                      "process per host: TPU pods, several GPU machines)")
    flags.DEFINE_string("coordinator_address", None, "with --distributed: HOST:PORT of "
                        "process 0 (not needed on Cloud TPU or under SLURM)")
    flags.DEFINE_integer("num_processes", None, "with --distributed: number of processes")
    flags.DEFINE_integer("process_id", None, "with --distributed: this process's index")
    flags.mark_flags_as_required(["workdir"])

    flags.DEFINE_bool("log_all_processes", False, "with several processes: every process "
                      "logs at INFO (by default only process 0; the others log warnings)")

    def program(_):
        import jax

        if flags_.distributed:
            # Cross-process collectives for CPU devices (ignored by GPU and TPU clients).
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
            jax.distributed.initialize(flags_.coordinator_address, flags_.num_processes,
                                       flags_.process_id)
        quiet = jax.process_index() > 0 and not flags_.log_all_processes
        logging.basicConfig(level=logging.WARNING if quiet else logging.INFO,
                            format=f"%(asctime)s [{jax.process_index()}] %(name)s: %(message)s"
                            if jax.process_count() > 1 else "%(asctime)s %(name)s: %(message)s",
                            datefmt="%H:%M:%S", force=True)
        run.quiet_libraries()
        devices = jax.devices()
        log.info("JAX %s, %s backend: %d device(s) (%s) in %d process(es)", jax.__version__,
                 jax.default_backend(), len(devices), devices[0].device_kind,
                 jax.process_count())
        try:
            summary = train_and_evaluate(flags_.config, flags_.workdir)
        except Exception as e:  # our own errors are the user's to fix: no traceback
            from tljax import checkpoint, config_args, datasets, freeze, pretrained

            known = (run.RunError, datasets.DataError, freeze.FreezeError, pretrained.InitError,
                     checkpoint.CheckpointError, config_args.ConfigError)
            if isinstance(e, known) or (isinstance(e, ValueError)
                                        and str(e).startswith("unknown model")):
                print(f"error: {e}", file=sys.stderr)
                return 2
            raise
        if summary.get("preempted"):
            return PREEMPTED_EXIT
        if jax.process_index() == 0:
            print(describe(summary))
        return 0

    try:
        app.run(lambda a: sys.exit(program(a)), argv=argv)
    except SystemExit as e:
        if e.code == 1 and any(a in ("--help", "-h", "--helpfull") for a in argv or []):
            return 0  # absl exits with 1 after printing the help
        return e.code if isinstance(e.code, int) else 0
    return 0


def _packaged_config(argv: list[str]) -> list[str]:
    """`argv` with a `--config` value whose file part names a config that ships with tljax
    (`finetune`, `finetune.py`) and no file here replaced by that config's path."""
    import os

    out = list(argv)
    for i, a in enumerate(out):
        if a == "--config" and i + 1 < len(out):
            i, a, prefix = i + 1, out[i + 1], ""
        elif a.startswith("--config="):
            a, prefix = a[len("--config="):], "--config="
        else:
            continue
        name, sep, rest = a.partition(":")
        bare = name.removesuffix(".py")
        if bare and os.sep not in name and not os.path.exists(name) \
                and os.path.exists(_config_path(bare)):
            out[i] = prefix + _config_path(bare) + sep + rest
    return out


def _config_path(name: str) -> str:
    """The file of the config `name` that ships with tljax (`tljax.configs`): in an installed
    package, or in a checkout that was not installed its top-level `configs/`."""
    import os

    try:
        from tljax import configs
    except ImportError:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        return os.path.join(root, "configs", f"{name}.py")
    return configs.path(name)


if __name__ == "__main__":
    sys.exit(main(sys.argv))

