"""Pictures: a run's learning curves drawn from its own metric history (so resumed runs plot every
epoch), and the pictures a report embeds (a named PNG; a thumbnail of an image on disk).

The history comes from the run's journal, not the server: the picture is drawn even when the
tracking server is down at the end of training.
"""

from __future__ import annotations

import hashlib
import io
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from matplotlib.figure import Figure  # the object API draws to files with no display or pyplot state
from matplotlib.ticker import MaxNLocator
from PIL import Image

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


def safe_file_name(text: str, max_length: int = 80) -> str:
    """`text` (a run's or comparison's name: anyone who can log a run chooses it) as one plain file name:
    no folder, no leading dot; a name that had to change gets a digest of the original, so two
    names never collide."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", text).lstrip(".-_")[:max_length] or "file"
    if safe == text:
        return safe
    stem, dot, suffix = safe.rpartition(".") if "." in safe else (safe, "", "")
    return f"{stem}-{hashlib.sha256(text.encode()).hexdigest()[:8]}{dot}{suffix}"


@dataclass(kw_only=True)
class Picture:
    name: str  # file name in the Markdown twin's folder (made safe: it may come from a run's name)
    png: bytes
    alt: str

    def __post_init__(self) -> None:
        self.name = safe_file_name(self.name)


def thumbnail(path: Path, name: str, size: int = 96) -> Picture | None:
    """An image from disk, scaled for a table cell; None when the file is not on this machine."""
    try:
        with Image.open(path) as image:
            image = image.convert("RGB").resize((size, size), Image.Resampling.NEAREST)
    except OSError:
        return None
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return Picture(name=name, png=buffer.getvalue(), alt=path.name)
