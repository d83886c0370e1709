"""Reading the prediction log that the handlers write (serving/handlers/prediction_log.py).

    <log>/<model>/<version>/predictions-<host>-<pid>.jsonl (+ .jsonl.1, the rotated file)

A record: {"id", "time", "version", "latency_ms", "input": {summary}, "answer": {...}}. A line cut
short by a crash (the last one of a file) is skipped, never an error.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from serving.client import read_server_file
from serving.server import PREDICTIONS

PATTERNS = ("predictions-*.jsonl", "predictions-*.jsonl.1")


@dataclass(frozen=True, kw_only=True)
class Window:
    start: float  # unix seconds
    end: float

    @classmethod
    def last(cls, seconds: float, *, now: float | None = None) -> Window:
        end = time.time() if now is None else now
        return cls(start=end - seconds, end=end)

    def holds(self, at: float) -> bool:
        return self.start <= at <= self.end


def log_folder(state_dir: Path, given: Path | None = None) -> Path:
    """The prediction log of the server (or fleet) of `state_dir`: where `dlops serve` put it, else `given`."""
    if given is not None:
        return Path(given)
    options = read_server_file(state_dir).get("options", {})
    recorded = options.get("prediction_log")
    return Path(recorded) if recorded and recorded != "None" else Path(state_dir) / PREDICTIONS


def records(folder: Path, model: str, version: str, window: Window | None = None) -> Iterator[dict]:
    """The logged records of `model` version `version` (in `window`), in no particular order."""
    for pattern in PATTERNS:
        for path in sorted((Path(folder) / model / version).glob(pattern)):
            with open(path, encoding="utf-8", errors="replace") as lines:
                for line in lines:
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError:  # a line cut short
                        continue
                    if window is None or window.holds(record.get("time", 0)):
                        yield record


def by_id(folder: Path, model: str) -> dict[str, dict]:
    """Every logged record of `model` (all versions), by request id."""
    found = {}
    for version_dir in sorted(p for p in (Path(folder) / model).glob("*") if p.is_dir()):
        for record in records(folder, model, version_dir.name):
            found[record["id"]] = record
    return found
