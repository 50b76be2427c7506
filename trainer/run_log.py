"""The run's metric log as training appends it: written line by line, and kept in memory, so the
epoch means and the plot never re-read the files (their cost would grow with the run).

The plot is redrawn at an epoch end only when ``PLOT_EVERY_S`` seconds have passed since the last
drawing, and always when the session ends; it is drawn from the same records the files hold.
"""
from __future__ import annotations

import json
import time
from itertools import takewhile

import numpy as np

from .plots import plot_records
from .run_dir import EPOCHS_FILE, PLOT_FILE, STEPS_FILE, RunDir

PLOT_EVERY_S = 60.0


def epoch_record(epoch_rows: list[dict], epoch: int, step: int) -> dict:
    """Means of the step metrics of one epoch (its rows, in step order)."""
    keys = [k for k in epoch_rows[0] if k not in ("step", "epoch")]
    return {"epoch": epoch, "step": step, "steps": len(epoch_rows)} | {k: float(np.mean([r[k] for r in epoch_rows])) for k in keys}


class RunLog:
    """Append-only step and epoch records of a run (main process only), from its files at start."""

    def __init__(self, run: RunDir):
        self.run = run
        self.steps = run.records(STEPS_FILE)
        self.epochs = run.records(EPOCHS_FILE)
        self.plotted = time.monotonic()

    def _append(self, name: str, records: list[dict], record: dict) -> dict:
        self.run.append(name, record)
        records.append(json.loads(json.dumps(record)))  # exactly what reading the line back gives
        return records[-1]

    def step(self, record: dict) -> None:
        self._append(STEPS_FILE, self.steps, record)

    def end_epoch(self, epoch: int, step: int) -> None:
        """Log the means of the epoch's steps (the trailing rows of this epoch); maybe redraw the plot."""
        rows = list(takewhile(lambda r: r["epoch"] == epoch, reversed(self.steps)))[::-1]
        self._append(EPOCHS_FILE, self.epochs, epoch_record(rows, epoch, step))
        if time.monotonic() - self.plotted >= PLOT_EVERY_S:
            self.plot()

    def plot(self) -> None:
        plot_records(self.run.file(PLOT_FILE), self.steps, self.epochs)
        self.plotted = time.monotonic()
