"""What one server serves, and what it served before: `<state dir>/serving.json`.

    {"resnet": [{"version": "3", "mar": "resnet-3.mar", "registered": "resnet-tinyimagenet/3",
                 "source": "models:/resnet-tinyimagenet@champion", "event": "deploy", "at": "..."}, ...],
     "lm": [...]}

One list per model, oldest first; the last entry is what answers now. `dlops serve` starts a
server with what its state dir served last, `dlops deploy` appends, `dlops rollback` serves the
entry before the current one again. The MLflow registry keeps the same history as version tags
(training/tracking/registry.py: record_event).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

SERVED_FILE = "serving.json"


@dataclass(kw_only=True, frozen=True)
class Deployment:
    model: str  # TorchServe's model name (/predictions/<model>)
    version: str  # TorchServe's version of it
    mar: str  # the archive's file name in the model store
    source: str = ""  # what the user deployed: a model URI, a checkpoint, an archive
    registered: str | None = None  # "NAME/VERSION" in the MLflow registry
    event: str = "deploy"  # serve | deploy | rollback
    at: str = ""  # UTC time

    def describe(self) -> str:
        origin = f" ({self.registered})" if self.registered else (f" ({self.source})" if self.source else "")
        return f"{self.model} version {self.version}{origin}"


def _path(state_dir: Path) -> Path:
    return Path(state_dir) / SERVED_FILE


def history(state_dir: Path) -> dict[str, list[Deployment]]:
    path = _path(state_dir)
    if not path.is_file():
        return {}
    raw = json.loads(path.read_text(encoding="utf-8"))
    return {model: [Deployment(**entry) for entry in entries] for model, entries in raw.items()}


def current(state_dir: Path, model: str) -> Deployment | None:
    entries = history(state_dir).get(model, [])
    return entries[-1] if entries else None


def serving_now(state_dir: Path) -> list[Deployment]:
    return [entries[-1] for entries in history(state_dir).values() if entries]


def last_archives(state_dir: Path, store: Path) -> dict[str, Path]:
    """Model -> the archive in `store` that the state dir served last (archives since deleted left out)."""
    return {d.model: store / d.mar for d in serving_now(state_dir) if (store / d.mar).is_file()}


def previous(state_dir: Path, model: str) -> Deployment | None:
    """What served `model` before the current version (a rollback's target)."""
    entries = history(state_dir).get(model, [])
    now = entries[-1].version if entries else None
    return next((e for e in reversed(entries) if e.version != now), None)


def record(state_dir: Path, deployment: Deployment) -> Deployment:
    """Append `deployment` (stamped now) as what serves its model; the file is replaced atomically."""
    stamped = Deployment(**{**asdict(deployment), "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    entries = history(state_dir)
    entries.setdefault(stamped.model, []).append(stamped)
    path = _path(state_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps({m: [asdict(e) for e in es] for m, es in entries.items()}, indent=1), encoding="utf-8")
    os.replace(tmp, path)
    return stamped
