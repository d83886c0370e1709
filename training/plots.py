"""Learning-curve pictures drawn from a run's own metric history (so resumed runs plot every epoch)."""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure  # the object API draws to files with no display or pyplot state
from matplotlib.ticker import MaxNLocator

from training import tracking

# One panel per entry: title -> metrics drawn in it.
RESNET_PANELS = {"loss": ["train/loss", "val/loss"], "Acc@1 (%)": ["train/acc1", "val/acc1"]}
LM_PANELS = {"loss": ["train/epoch_loss", "val/loss"], "perplexity": ["val/ppl"]}


def learning_curves(run_id: str, panels: dict[str, list[str]], path: Path, title: str) -> Path:
    """Draw each panel's metric histories against their step; return the PNG path."""
    client = tracking.store_client()
    figure = Figure(figsize=(6 * len(panels), 4))
    axes = figure.subplots(1, len(panels), squeeze=False)[0]
    for ax, (name, metrics) in zip(axes, panels.items(), strict=True):
        for metric in metrics:
            history = sorted(client.get_metric_history(run_id, metric), key=lambda m: m.step)
            if history:
                ax.plot([m.step for m in history], [m.value for m in history], marker="o", markersize=3, label=metric)
        ax.set_title(name)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend()
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    return path
