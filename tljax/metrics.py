"""Training metrics: `metrics.jsonl`, TensorBoard event files, and the curves plot.

One record per line in `WORKDIR/metrics.jsonl`: `{"step": 100, "train/loss": ..., ...}`; keys are
`train/loss`, `train/accuracy`, `learning_rate`, `images_per_second` (every `log_every` steps)
and `eval/loss`, `eval/top1`, `eval/top5` (every `eval_every` steps and at the end). The same
scalars go to TensorBoard (`tensorboard --logdir WORKDIR/tensorboard`). A resumed run first drops
the records after the step it resumes from, so the file reads as one uninterrupted run.
Only process 0 writes.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence

log = logging.getLogger("tljax.metrics")

JSONL = "metrics.jsonl"
PLOT = "curves.png"


class Writer:
    """Writes scalars to `metrics.jsonl` and TensorBoard (a no-op when not `enabled`)."""

    def __init__(self, workdir: str, enabled: bool = True, resume_step: int = 0):
        self.enabled = enabled
        self.path = os.path.join(workdir, JSONL)
        self._tb = None
        if not enabled:
            return
        records = read(workdir)
        with open(self.path, "w") as f:
            for r in records:
                if r["step"] <= resume_step:
                    f.write(json.dumps(r) + "\n")
        import tensorflow as tf

        self._tb = tf.summary.create_file_writer(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, scalars: dict) -> None:
        if not self.enabled:
            return
        scalars = {k: float(v) for k, v in scalars.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": int(step), **scalars}) + "\n")
        import tensorflow as tf

        with self._tb.as_default(step=int(step)):
            for k, v in scalars.items():
                tf.summary.scalar(k, v)
        self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read(workdir: str) -> list[dict]:
    """The records of `WORKDIR/metrics.jsonl` (empty when there is none)."""
    path = os.path.join(workdir, JSONL)
    if not os.path.exists(path):
        return []
    records = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:  # a line cut by a kill: the rest is still good
                    log.warning("%s: skipping an unreadable line", path)
    return records


def plot(workdir: str, title: str = "", phase_ends: Sequence[int] = ()) -> str:
    """Training and evaluation curves (loss; accuracy and top-1/top-5; learning rate) as
    `WORKDIR/curves.png`, with a dotted line where each phase but the last ends."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read(workdir)

    def series(key):
        pts = [(r["step"], r[key]) for r in records if key in r]
        return [p[0] for p in pts], [p[1] for p in pts]

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for key, style in (("train/loss", "-"), ("eval/loss", "o-")):
        axes[0].plot(*series(key), style, label=key)
    axes[0].set_title("loss")
    for key, style in (("train/accuracy", "-"), ("eval/top1", "o-"), ("eval/top5", "o--")):
        axes[1].plot(*series(key), style, label=key)
    axes[1].set_title("accuracy")
    axes[1].set_ylim(0, 1.0)
    axes[2].plot(*series("learning_rate"), "-", label="learning_rate")
    axes[2].set_title("learning rate")
    for ax in axes:
        for end in phase_ends:
            ax.axvline(end, color="grey", linestyle=":")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = os.path.join(workdir, PLOT)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
