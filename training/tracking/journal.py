"""A run's durable tracking journal: every call is a line on disk before it returns.

    RUN_DIR/journal/records.jsonl   one JSON record per line, appended and fsynced
    RUN_DIR/journal/delivered       how many records the tracking server has (the sender's cursor)
    RUN_DIR/journal/run.json        the server's run id (once known), experiment, tracking URI
    RUN_DIR/journal/spool/          text artifacts written at call time (their content is fixed then)
    RUN_DIR/journal/lock            held by the one process delivering (flock: freed when it dies)

Records are the typed kinds of training/tracking/records.py (create_run, status, params, tags,
metrics, artifact, artifact_dir, text, register, log_model, end), one JSON line each. The journal
is also the run's own memory: which metric steps were logged, and their values for the
learning-curve picture, come from here, not from the server.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from training.tracking.artifacts import (
    JOURNAL,
    JOURNAL_DELIVERED,
    JOURNAL_LOCK,
    JOURNAL_RECORDS,
    JOURNAL_SPOOL,
    JOURNAL_STATE,
)
from training.tracking.records import Metrics, Record, from_line, to_line


class JournalBusy(RuntimeError):
    """Another live process is delivering this journal."""


def write_atomic(path: Path, text: str) -> None:
    """Replace `path` with `text` atomically: a crash leaves the old file or the new one, never half."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


class Journal:
    def __init__(self, run_dir: Path):
        self.dir = Path(run_dir) / JOURNAL
        self.spool_dir = self.dir / JOURNAL_SPOOL
        self.spool_dir.mkdir(parents=True, exist_ok=True)
        self.records_path = self.dir / JOURNAL_RECORDS
        self._drop_torn_tail()
        self._records = self._read_all()
        self._file = self.records_path.open("a", encoding="utf-8")

    # --- writing (the training thread) -----------------------------------------------------------
    def _drop_torn_tail(self) -> None:
        """A crash mid-append leaves a line without its newline: that call never returned, drop it."""
        if not self.records_path.exists():
            return
        data = self.records_path.read_bytes()
        if data and not data.endswith(b"\n"):
            with self.records_path.open("r+b") as f:
                f.truncate(data.rfind(b"\n") + 1)

    def _read_all(self) -> list[dict[str, Any]]:
        if not self.records_path.exists():
            return []
        with self.records_path.open(encoding="utf-8") as f:
            return [from_line(json.loads(line)) for line in f if line.endswith("\n")]

    def append(self, record: Record) -> Record:
        """Add a record, stamped with the time; it is on disk (fsynced) when this returns."""
        record = dataclasses.replace(record, time=int(time.time() * 1000))
        self._file.write(json.dumps(to_line(record), ensure_ascii=False) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())
        self._records.append(record)
        return record

    def spool_text(self, text: str, name: str) -> Path:
        """Keep a text artifact's content as it is now (delivery may come much later)."""
        path = self.spool_dir / f"{len(self._records):06d}-{Path(name).name}"
        path.write_text(text, encoding="utf-8")
        return path

    def close(self) -> None:
        self._file.close()

    # --- reading ---------------------------------------------------------------------------------
    @property
    def records(self) -> list[Record]:
        return self._records

    def metric_steps(self, key: str) -> set[int]:
        return {r.step for r in self._records if isinstance(r, Metrics) and key in r.metrics}

    def metric_history(self, key: str) -> list[tuple[int, float]]:
        """(step, value) of every logged point of `key`, the last value per step, by step."""
        points = {r.step: r.metrics[key] for r in self._records if isinstance(r, Metrics) and key in r.metrics}
        return sorted(points.items())

    # --- delivery state --------------------------------------------------------------------------
    @property
    def delivered(self) -> int:
        path = self.dir / JOURNAL_DELIVERED
        return int(path.read_text()) if path.exists() else 0

    def mark_delivered(self, count: int) -> None:
        write_atomic(self.dir / JOURNAL_DELIVERED, str(count))

    @property
    def pending(self) -> int:
        return len(self._records) - self.delivered

    def state(self) -> dict[str, Any]:
        path = self.dir / JOURNAL_STATE
        return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}

    def update_state(self, **fields: Any) -> dict[str, Any]:
        state = {**self.state(), **fields}
        write_atomic(self.dir / JOURNAL_STATE, json.dumps(state, indent=1))
        return state

    @contextmanager
    def delivery_lock(self) -> Iterator[None]:
        """Exclusive right to deliver this journal; a second process gets JournalBusy at once."""
        with (self.dir / JOURNAL_LOCK).open("a+") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError as e:
                lock.seek(0)
                holder = lock.read().strip() or "another process"
                raise JournalBusy(f"{self.dir} is being delivered by {holder}") from e
            lock.seek(0)
            lock.truncate()
            lock.write(f"process {os.getpid()}")
            lock.flush()
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)


def find_journals(path: Path) -> list[Path]:
    """Folders under `path` (or `path` itself) that hold a journal: runs, and a multi-node run's node journals
    (after their run, which sorts first)."""
    return sorted(p.parent.parent for p in Path(path).glob(f"**/{JOURNAL}/{JOURNAL_RECORDS}"))


def names_other_server(state: dict[str, Any], uri: str) -> bool:
    """Whether a journal's state (run.json) puts its run on another tracking server than `uri`: its records are
    never sent to `uri` (a folder is data, not an instruction where to send a login)."""
    named = state.get("tracking_uri")
    return bool(state.get("run_id") and named and named.rstrip("/") != uri.rstrip("/"))


def server_run_id(run_dir: Path, recorded: str | None) -> str | None:
    """The tracking server's id of the run whose folder is `run_dir`: an offline run's checkpoints
    carry a local id until `dlops sync` creates the run; its journal then knows the server's."""
    path = Path(run_dir) / JOURNAL / JOURNAL_STATE
    if path.is_file():
        state = json.loads(path.read_text(encoding="utf-8"))
        if state.get("local_id") == recorded or state.get("run_id"):
            return state.get("run_id") or recorded
    return recorded
