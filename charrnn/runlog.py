"""The run record a person reads: log lines, per-evaluation metrics (CSV + JSON), a loss curve.

Written by rank 0 beside the checkpoints: `<run>/metrics.csv`, `<run>/metrics.json` and
`<run>/loss_curve.png` (train vs validation loss in nats/char against optimizer steps).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import sys
import time

from charrnn import storage

LN2 = math.log(2)
COLUMNS = ("epoch", "step", "train_loss", "val_loss", "train_bpc", "val_bpc", "lr",
           "chars_per_s", "elapsed_s")


def say(line: str) -> None:
    """One log line for the person watching, flushed. Written to stdout rather than printed:
    in a Ray Train 2.60 worker `print` is patched to go both to the root logger's console
    handler and to Ray's wrapped stdout, so every printed line reached the driver twice."""
    try:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()
    except OSError as e:
        # The reader went away (`| head`, a `tee` that died), or the disk of `> train.log` is
        # full. A run does not stop for it: what it logs is also in metrics.csv, and Ctrl-C still
        # saves and stops it.
        discard_stdout()
        why = ("stdout was closed by its reader" if isinstance(e, BrokenPipeError)
               else f"cannot write to stdout ({e.strerror})")
        note(f"{why}; the run goes on without printing (metrics.csv and metrics.json in the run "
             "directory keep its record)")


def discard_stdout() -> None:
    """Point stdout at /dev/null once its pipe is broken, so later writes (and Python's flush at
    exit, which would report the broken pipe again) cost nothing and raise nothing."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    finally:
        os.close(devnull)


def note(line: str) -> None:
    """A line on stderr, where progress goes while stdout carries results (generated texts);
    a stderr that cannot be written does not stop the work it reports on."""
    try:
        sys.stderr.write(line + "\n")
        sys.stderr.flush()
    except OSError:  # stderr went with stdout (`2>&1 | head`)
        pass


class Every:
    """`due()` is True at most once per `seconds`: the pace of progress lines on long steps."""

    def __init__(self, seconds: float):
        self.seconds, self.last = seconds, time.monotonic()

    def due(self) -> bool:
        now = time.monotonic()
        if now - self.last < self.seconds:
            return False
        self.last = now
        return True


def bpc(nats: float) -> float:
    """nats/char -> bits/char."""
    return nats / LN2


def fmt_duration(s: float) -> str:
    if not math.isfinite(s):
        return "?"
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def epoch_line(m: dict, epochs: int, eta_s: float, sample: str) -> str:
    return (f"epoch {m['epoch']:.2f}/{epochs} step {m['step']} | "
            f"train {m['train_loss']:.4f} nats/char ({m['train_bpc']:.3f} bpc) | "
            f"val {m['val_loss']:.4f} nats/char ({m['val_bpc']:.3f} bpc) | "
            f"{m['chars_per_s']:,.0f} chars/s | eta {fmt_duration(eta_s)}"
            + (f" | sample: {sample!r}" if sample else ""))


def progress_line(epoch: int, epochs: int, step: int, steps: int, loss: float,
                  chars_per_s: float, eta_s: float) -> str:
    return (f"  epoch {epoch + 1}/{epochs} step {step}/{steps} | loss {loss:.4f} | "
            f"{chars_per_s:,.0f} chars/s | eta {fmt_duration(eta_s)}")


def to_csv(history: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS, extrasaction="ignore")
    w.writeheader()
    w.writerows(history)
    return buf.getvalue()


def plot_png(history: list[dict], run: str = "charrnn") -> bytes:
    import matplotlib
    matplotlib.use("Agg")  # no display on servers
    import matplotlib.pyplot as plt
    steps = [m["step"] for m in history]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot(steps, [m["train_loss"] for m in history], "o-", label="train")
    ax.plot(steps, [m["val_loss"] for m in history], "s-", label="validation")
    best = min(history, key=lambda m: m["val_loss"])
    ax.axhline(best["val_loss"], color="grey", lw=0.8, ls="--")
    ax.set(xlabel="optimizer step", ylabel="loss (nats/char)",
           title=f"{run}: best validation {best['val_loss']:.3f} nats/char at step {best['step']}")
    ax.grid(alpha=0.3)
    ax.legend()
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def write_record(run_uri: str, history: list[dict], run_name: str, plot: bool = True) -> None:
    """Rewrite metrics (one row per evaluation) and, when `plot`, the loss curve."""
    storage.write_text(storage.join(run_uri, "metrics.json"), json.dumps(history, indent=1))
    storage.write_text(storage.join(run_uri, "metrics.csv"), to_csv(history))
    if plot and history:
        storage.write_bytes(storage.join(run_uri, "loss_curve.png"),
                            plot_png(history, f"run {run_name!r}"))

