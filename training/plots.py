"""Learning-curve pictures drawn from a run's own metric history (so resumed runs plot every epoch).

The history comes from the run's journal, not the server: the picture is drawn even when the
tracking server is down at the end of training.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from matplotlib.figure import Figure  # the object API draws to files with no display or pyplot state
from matplotlib.ticker import MaxNLocator

History = Callable[[str], list[tuple[int, float]]]  # metric -> [(step, value), ...]


def learning_curves(history: History, panels: dict[str, list[str]], path: Path, title: str) -> Path:
    """Draw each panel (title -> metrics, declared by the job) against the epoch; return the PNG path."""
    figure = Figure(figsize=(6 * len(panels), 4))
    axes = figure.subplots(1, len(panels), squeeze=False)[0]
    for ax, (name, metrics) in zip(axes, panels.items(), strict=True):
        for metric in metrics:
            points = history(metric)
            if points:
                ax.plot([s for s, _ in points], [v for _, v in points], marker="o", markersize=3, label=metric)
        ax.set_title(name)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend()
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    return path
