"""What a training run tells people while it runs: epoch lines with ETA, a heartbeat inside long
epochs, per-epoch history and TensorBoard curves indexed by the run's own epoch.

On a terminal the heartbeat is a tqdm bar; otherwise (logs, ``ray job logs``) a plain line at
most every ``interval`` seconds, so a one-epoch run is never silent for minutes and redirected
output holds no control characters.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

Say = Callable[[str], None]

_CURVES = ("train_loss", "val_loss", "val_auc", "lr", "samples_per_s", "epoch_time_s")


def fmt_metric(x: float | None) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"


def fmt_seconds(s: float) -> str:
    if not math.isfinite(s):
        return "?"
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class EpochProgress:
    """Per-epoch lines ("epoch 3/20 … elapsed 1m02s, ETA 5m40s") and an in-epoch heartbeat."""

    def __init__(
        self,
        say: Say,
        epochs: int,
        *,
        label: str = "",
        interval: float = 30.0,
        tty: bool | None = None,
    ) -> None:
        self.say, self.epochs, self.label, self.interval = say, epochs, label, interval
        self.tty = sys.stderr.isatty() if tty is None else tty
        self.started = time.monotonic()
        self._last_beat = self.started
        self._bar: Any = None

    def _prefix(self) -> str:
        return f"{self.label} " if self.label else ""

    def epoch_line(self, metrics: dict[str, Any]) -> str:
        epoch = int(metrics["epoch"])
        elapsed = time.monotonic() - self.started
        eta = elapsed / max(epoch, 1) * (self.epochs - epoch)
        parts = [f"{self._prefix()}epoch {epoch}/{self.epochs}"]
        parts.append(f"train_loss {metrics['train_loss']:.4f}")
        if math.isfinite(metrics.get("val_loss", math.nan)):
            parts.append(f"val_loss {metrics['val_loss']:.4f}")
            parts.append(f"val_auc {fmt_metric(metrics.get('val_auc'))}")
        parts.append(f"{metrics.get('samples_per_s', math.nan):.1f} samples/s")
        parts.append(f"elapsed {fmt_seconds(elapsed)}, ETA {fmt_seconds(eta)}")
        return "  ".join(parts)

    def on_epoch(self, metrics: dict[str, Any]) -> None:
        self._close_bar()
        self.say(self.epoch_line(metrics))
        self._last_beat = time.monotonic()

    def heartbeat(self, batch: int, n_batches: int, seconds: float) -> None:
        if self.tty:
            self._tick(batch, n_batches)
            return
        now = time.monotonic()
        if now - self._last_beat < self.interval:
            return
        self._last_beat = now
        left = seconds / batch * (n_batches - batch) if n_batches and batch else math.nan
        self.say(
            f"{self._prefix()}  batch {batch}/{n_batches or '?'} of this epoch, "
            f"{fmt_seconds(seconds)} in, ~{fmt_seconds(left)} to the epoch's end"
        )

    def _tick(self, batch: int, n_batches: int) -> None:
        if self._bar is None:
            from tqdm import tqdm

            self._bar = tqdm(total=n_batches or None, leave=False, desc="batches", unit="batch")
        self._bar.update(batch - self._bar.n)

    def _close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def close(self) -> None:
        self._close_bar()


class Curves:
    """``history.csv`` rows and TensorBoard scalars ``<prefix><name>`` at step = epoch."""

    def __init__(self, tensorboard_dir: Path | None, prefix: str) -> None:
        self.prefix = prefix
        self.rows: list[dict[str, Any]] = []
        self._writer: Any = None
        if tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is a dependency; keep training if it is broken
                return
            self._writer = SummaryWriter(log_dir=str(tensorboard_dir), flush_secs=30)

    def add(self, metrics: dict[str, Any]) -> None:
        self.rows.append({k: metrics.get(k) for k in ("epoch", *_CURVES)})
        if self._writer is None:
            return
        step = int(metrics["epoch"])
        for name in _CURVES:
            value = metrics.get(name)
            if isinstance(value, int | float) and math.isfinite(value):
                self._writer.add_scalar(f"{self.prefix}{name}", float(value), step)

    def history_csv(self) -> str:
        import pandas as pd

        from breastfusion.runs import csv_text

        return csv_text(pd.DataFrame(self.rows, columns=["epoch", *_CURVES]))

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
