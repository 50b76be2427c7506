"""The training plot: loss and the objective's accuracies per optimizer step, with epoch means."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402

from cosettle.core.atomic import write_atomic  # noqa: E402

LABELS = {"acc": "cycle accuracy"}  # Co-Settle logs its cycle accuracy as "acc"
MAX_PANELS = 4


def plot_records(path: Path, steps: list[dict], epochs: list[dict]) -> None:
    """Write the plot of step records and epoch means to ``path`` (panels for the metrics they have)."""
    keys = ["loss"] + [k for k in steps[0] if k.startswith("acc")][: MAX_PANELS - 1]
    panels = [(k, LABELS.get(k, k)) for k in keys]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.5), squeeze=False)
    for ax, (key, label) in zip(axes[0], panels):
        ax.plot([r["step"] for r in steps], [r[key] for r in steps], lw=0.8, alpha=0.6, label="step")
        if epochs:
            ax.plot([r["step"] for r in epochs], [r[key] for r in epochs], "o-", label="epoch mean")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    try:
        write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    finally:
        plt.close(fig)
