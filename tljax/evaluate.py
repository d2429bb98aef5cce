"""Evaluate a training checkpoint on a split: `python -m tljax.evaluate --workdir DIR`.

  python -m tljax.evaluate --workdir runs/digits_lite0           # best checkpoint, validation
  python -m tljax.evaluate --workdir runs/digits_lite0 --split test   # ... on the test split
  python -m tljax.evaluate --workdir runs/digits_lite0 --checkpoint latest --split train
  python -m tljax.evaluate --workdir runs/digits_ema --params raw  # not the moving average

The model, dataset and preprocessing are those of the run (`WORKDIR/config.json`). The
checkpoint is laid out over this machine's devices, whatever number the run had.
"""

from __future__ import annotations

if __name__ == "__main__":  # the program's allocator policy, before any thread allocates
    from tljax import host_memory

    host_memory.keep_freed_memory()

import argparse
import json
import logging
import sys

log = logging.getLogger("tljax.evaluate")


def evaluate(workdir: str, checkpoint: str = "best", split: str = "", batch_size: int = 0,
             params: str = "") -> dict:
    """Top-1, top-5 and loss of `workdir`'s checkpoint (`best`: selected on validation,
    `latest`, or a step) on `split` (default: the run's validation split), with its
    `params`: 'raw', 'ema' (the moving average), or '' for those the run selected on."""
    return evaluate_many(workdir, [(checkpoint, params)], split, batch_size)[0]


def evaluate_many(workdir: str, checkpoints: list[tuple[str, str]], split: str = "",
                  batch_size: int = 0) -> list[dict]:
    """`evaluate` of each `(checkpoint, params)` of `checkpoints`, with the dataset read once,
    the model built and the step compiled once."""
    import jax
    import ml_collections
    import numpy as np

    from tljax import checkpoint as ckpt_lib
    from tljax import datasets, parallel, run, storage, train, trained
    from tljax import train_step as steps
    from tljax.models import preprocessing, registry

    path = storage.join(workdir, "config.json")
    if not storage.exists(path):
        raise run.RunError(f"{workdir} is not a training workdir: config.json is missing")
    record = json.loads(storage.read_text(path))
    config = ml_collections.ConfigDict(record)
    selected = record.get("select_on", run.IMPLIED["select_on"])
    for _, params in checkpoints:
        if params not in ("", "raw", "ema"):
            raise run.RunError(f"params={params!r}: 'raw', 'ema' (the moving average), or '' "
                               f"for those the run selected on ({selected})")
        if params == "ema" and record.get("ema_decay") is None:
            raise run.RunError(f"{workdir} kept no moving average of its parameters (its "
                               f"config.ema_decay is None): pass --params raw, or leave "
                               f"--params out")
    wanted = [(trained.choose_step(workdir, c), p or selected) for c, p in checkpoints]
    ckpts = ckpt_lib.Checkpoints(storage.join(workdir, "checkpoints"), asynchronous=False,
                                 read_only=True)
    chosen = list(dict.fromkeys(wanted))  # each checkpoint and kind restored and run once

    src = datasets.source(config.dataset, config.data_dir or None, config.download,
                          config.holdout)
    split = split or config.get("validation_split") or config.get("eval_split")
    r = run.Resolved(config, src, config.num_classes, config.image_size, config.train_split,
                     split, None)
    model = run.build_model(r)
    shapes = jax.eval_shape(model.init, jax.random.key(0),
                            jax.ShapeDtypeStruct((1, r.image_size, r.image_size, 3), "float32"))
    mesh = parallel.mesh()
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
        {"params": shapes["params"], "batch_stats": shapes.get("batch_stats", {})})
    prep = preprocessing.FUNCTIONS[registry.spec(config.model).numerics.preprocessing]
    step_config = steps.StepConfig(model=model, tx=None, trainable=frozenset(),
                                   preprocess=prep)
    eval_fn = parallel.shard_map_eval_step(step_config, mesh)
    global_batch = batch_size or config.eval_batch_size or config.batch_size
    local = parallel.check_batch(global_batch, jax.device_count()) * jax.local_device_count()
    recs = src.records(split, datasets.budget(config.get("data_cache_gb",
                                                         datasets.DEFAULT_BUDGET_GB)))
    states = []
    for step, params in chosen:  # no optimizer state is needed
        variables = ckpts.restore_variables(step, abstract, params)
        states.append(steps.TrainState(step=np.int32(0), params=variables["params"],
                                       batch_stats=variables["batch_stats"], opt_state=()))
    ckpts.close()
    batches, _ = datasets.eval_batches(recs, local, r.image_size, config.eval_crop,
                                       jax.process_index(), jax.process_count(),
                                       f"{src.name} [{split}]")
    results = dict(zip(chosen, train.run_evals(eval_fn, states, batches, mesh), strict=True))
    return [{"step": int(step), "params": params, "split": split,
             "examples": int(results[step, params]["count"]),
             **{k: results[step, params][k] for k in ("top1", "top5", "loss")}}
            for step, params in wanted]


def main(argv=None) -> int:
    from tljax import trained

    parser = argparse.ArgumentParser(prog="python -m tljax.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True, help="a training workdir")
    trained.add_arguments(parser, step="--checkpoint")
    parser.add_argument("--split", default="", help="split to evaluate (default: the run's "
                        "validation split; 'test' for its test split); TFDS slices such as "
                        "'train[:10%%]' work")
    parser.add_argument("--batch_size", type=int, default=0, help="global batch (default: "
                        "the run's)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    from tljax import checkpoint, datasets, run

    run.quiet_libraries()

    try:
        result = evaluate(args.workdir, args.checkpoint, args.split, args.batch_size,
                          args.params)
    except (run.RunError, datasets.DataError, checkpoint.CheckpointError,
            trained.LoadError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result))
    else:
        kind = " (moving average)" if result["params"] == "ema" else ""
        print(f"{args.workdir} step {result['step']}{kind} on {result['split']} "
              f"({result['examples']} images): top-1 {result['top1']:.4f}, top-5 "
              f"{result['top5']:.4f}, loss {result['loss']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
