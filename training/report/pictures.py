"""The report's pictures, drawn with matplotlib's object API (no display, no pyplot state)."""

from __future__ import annotations

import io

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from training.metrics import Metric
from training.plots import Picture


def _png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png", dpi=90)
    return buffer.getvalue()


def learning_curves(series: list[dict], kind: str, quality: Metric) -> Picture:
    """Loss (train dashed, val solid) and the job's quality metric of every run of `kind`, overlaid by
    epoch; a star on each run's best epoch, a dotted line where its overfitting starts."""
    runs = [s for s in series if s["kind"] == kind]
    quality_title = quality.label
    figure = Figure(figsize=(12, 4.5))
    loss_ax, quality_ax = figure.subplots(1, 2)
    for index, s in enumerate(runs):
        colour = f"C{index % 10}"
        if s["train_loss"]:
            loss_ax.plot(*zip(*s["train_loss"], strict=True), linestyle="--", color=colour, alpha=0.7)
        if s["val_loss"]:
            loss_ax.plot(*zip(*s["val_loss"], strict=True), marker="o", markersize=3, color=colour, label=s["name"])
        if s["quality"]:
            quality_ax.plot(*zip(*s["quality"], strict=True), marker="o", markersize=3, color=colour, label=s["name"])
            best = dict(s["quality"]).get(s["best_epoch"])
            if best is not None:
                quality_ax.plot([s["best_epoch"]], [best], marker="*", markersize=14, color=colour)
        if s["overfit_epoch"] is not None:
            for ax in (loss_ax, quality_ax):
                ax.axvline(s["overfit_epoch"], color=colour, linestyle=":", alpha=0.8)
            where = (s["overfit_epoch"], dict(s["val_loss"])[s["overfit_epoch"]])
            loss_ax.annotate(f"overfitting from {s['overfit_epoch']}", where, textcoords="offset points",
                             xytext=(4, 6), fontsize=8, color=colour)  # fmt: skip
    for ax, title in ((loss_ax, "loss (train dashed, val solid)"), (quality_ax, quality_title)):
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    quality_ax.legend(fontsize=8)
    values = [v for s in runs for _, v in s["quality"]]
    if quality.log_scale and values and min(values) > 0 and max(values) > 10 * min(values):  # falls by orders
        quality_ax.set_yscale("log")
    return Picture(name=f"curves-{kind}.png", png=_png(figure), alt=f"learning curves of {len(runs)} runs ({kind})")
