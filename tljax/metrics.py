"""Training metrics: `metrics.jsonl`, TensorBoard event files, and the curves plot.

One record per line in `WORKDIR/metrics.jsonl`: `{"step": 100, "train/loss": ..., ...}`; keys are
`train/loss`, `train/accuracy`, `learning_rate`, `images_per_second` (every `log_every` steps)
and `eval/loss`, `eval/top1`, `eval/top5` (every `eval_every` steps and at the end). The same
scalars go to TensorBoard (`tensorboard --logdir WORKDIR/tensorboard`). A resumed run first drops
the records after the step it resumes from, so the file reads as one uninterrupted run.
Only process 0 writes.
"""

from __future__ import annotations

import io
import json
import logging
import os
import socket
import time
from collections.abc import Sequence

from tensorboard.summary.writer.record_writer import RecordWriter

from tljax import storage

log = logging.getLogger("tljax.metrics")

JSONL = "metrics.jsonl"
PLOT = "curves.png"


class Writer:
    """Writes scalars to `metrics.jsonl` and TensorBoard event files (a no-op when not
    `enabled`), in a local or `gs://` workdir (`tljax.storage`)."""

    def __init__(self, workdir: str, enabled: bool = True, resume_step: int = 0):
        self.enabled = enabled
        self._jsonl = self._events = None
        if not enabled:
            return
        kept = "".join(json.dumps(r) + "\n" for r in read(workdir) if r["step"] <= resume_step)
        self._jsonl = storage.Appender(storage.join(workdir, JSONL), kept.encode())
        events = storage.join(workdir, "tensorboard")
        storage.makedirs(events)
        name = (f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}."
                f"{os.getpid()}.tljax")
        self._events = RecordWriter(storage.Appender(storage.join(events, name)))
        self._event(file_version="brain.Event:2")

    def _event(self, **fields) -> None:
        from tensorboard.compat.proto import event_pb2

        event = event_pb2.Event(wall_time=time.time(), **fields)
        self._events.write(event.SerializeToString())
        self._events.flush()

    def write(self, step: int, scalars: dict) -> None:
        if not self.enabled:
            return
        from tensorboard.compat.proto import summary_pb2

        scalars = {k: float(v) for k, v in scalars.items()}
        self._jsonl.write((json.dumps({"step": int(step), **scalars}) + "\n").encode())
        self._jsonl.flush()
        self._event(step=int(step), summary=summary_pb2.Summary(value=[
            summary_pb2.Summary.Value(tag=k, simple_value=v) for k, v in scalars.items()]))

    def close(self) -> None:
        if self._events is not None:
            self._events.close()
            self._jsonl.close()


def read(workdir: str) -> list[dict]:
    """The records of `WORKDIR/metrics.jsonl` (empty when there is none)."""
    path = storage.join(workdir, JSONL)
    if not storage.exists(path):
        return []
    records = []
    for line in storage.read_text(path).splitlines():
        line = line.strip()
        if line:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by a kill: the rest is still good
                log.warning("%s: skipping an unreadable line", path)
    return records


def plot(workdir: str, title: str = "", phase_ends: Sequence[int] = ()) -> str:
    """Training and evaluation curves (loss; accuracy and top-1/top-5, also of the moving
    average of the parameters when the run kept one; learning rate) as
    `WORKDIR/curves.png`, with a dotted line where each phase but the last ends."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read(workdir)

    def series(key):
        pts = [(r["step"], r[key]) for r in records if key in r]
        return [p[0] for p in pts], [p[1] for p in pts]

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    ema = any("eval_ema/top1" in r for r in records)  # the moving average's, when kept
    for key, style in (("train/loss", "-"), ("eval/loss", "o-")) + (
            (("eval_ema/loss", "s-"),) if ema else ()):
        axes[0].plot(*series(key), style, label=key)
    axes[0].set_title("loss")
    for key, style in (("train/accuracy", "-"), ("eval/top1", "o-"), ("eval/top5", "o--")) + (
            (("eval_ema/top1", "s-"),) if ema else ()):
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
    path = storage.join(workdir, PLOT)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    storage.write_bytes(path, buffer.getvalue())
    return path
