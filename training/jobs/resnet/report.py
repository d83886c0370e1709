"""The classifier's own sections of `dlops report`: the device benchmark (`dlops bench devices`) and
comparisons of two checkpoints (`dlops compare`), with thumbnails of the images they disagree on."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from training.jobs.resnet.metrics import ACC1, DATA_WAIT_SHARE, IMAGES_PER_SECOND
from training.metrics import TOTAL_SECONDS
from training.plots import thumbnail
from training.tracking.store import download_text
from training.tracking.tags import BENCH_CONFIG, COMPARE, COMPARISON_ID

TEMPLATES = Path(__file__).resolve().parent / "templates"
THUMBNAILS = 8  # the most confident disagreements shown with their images


def bench_section(client: Any, runs: list[Any]) -> dict[str, Any] | None:
    """Each benchmarked configuration's throughput, data wait and accuracy, from its run's history."""
    benched = [r for r in runs if COMPARISON_ID in r.tags and BENCH_CONFIG in r.tags]
    if not benched:
        return None
    rows = []
    for r in benched:
        rate, wait = r.history(client, IMAGES_PER_SECOND), r.history(client, DATA_WAIT_SHARE)
        acc = r.history(client, ACC1.name)
        rows.append({"configuration": r.tags[BENCH_CONFIG], "processes": r.params.get("world_size", "1"),
                     "workers": r.params.get("workers", ""), "epochs": len(acc),
                     "seconds": r.metrics.get(TOTAL_SECONDS),
                     "images_per_s": sum(v for _, v in rate) / len(rate) if rate else None,
                     "data_wait": sum(v for _, v in wait) / len(wait) if wait else None,
                     "val_acc1": acc[-1][1] if acc else None})  # fmt: skip
    return {"comparisons": sorted({r.tags[COMPARISON_ID] for r in benched}), "rows": rows}


def comparisons_section(client: Any, runs: list[Any]) -> dict[str, Any] | None:
    """Each comparison: both models' accuracies, their agreement, and the first disagreements with images."""
    from training.jobs.resnet.compare import (
        A_ACC1,
        A_ACC5,
        AGREEMENT,
        B_ACC1,
        B_ACC5,
        DISAGREEMENTS,
        DISAGREEMENTS_CSV,
        SOURCE_A,
        SOURCE_B,
    )

    compared = [r for r in runs if r.kind == COMPARE]
    if not compared:
        return None
    comparisons, pictures = [], []
    for r in compared:
        text = download_text(client, r.id, DISAGREEMENTS_CSV)
        rows = list(csv.DictReader(text.splitlines()))[:THUMBNAILS] if text else []
        for index, row in enumerate(rows):
            row["thumbnail"] = thumbnail(Path(row["path"]), f"{r.name}-{index}.png")
            pictures += [row["thumbnail"]] if row["thumbnail"] else []
        m = r.metrics
        comparisons.append({"name": r.name, "run_a": r.tags.get(SOURCE_A), "run_b": r.tags.get(SOURCE_B),
                            "a_acc1": m.get(A_ACC1), "b_acc1": m.get(B_ACC1), "a_acc5": m.get(A_ACC5),
                            "b_acc5": m.get(B_ACC5), AGREEMENT: m.get(AGREEMENT),
                            DISAGREEMENTS: m.get(DISAGREEMENTS), "images": r.params.get("images"),
                            "first": rows})  # fmt: skip
    return {"comparisons": comparisons, "pictures": pictures}
