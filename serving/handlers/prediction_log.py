"""The prediction log: a sampled share of a served version's requests and answers, as JSON lines.

Each TorchServe worker appends to its own file, <folder>/<model>/<version>/predictions-<host>-<pid>.jsonl
(one writer per file: no lock, no interleaved lines, even for the servers of a fleet in containers
that share the folder), one line per sampled request:

    {"id": request id (the answer's X-Dlops-Request-Id), "time": unix seconds, "version": "3",
     "latency_ms": the batch's time in the handler, "summary": {...}, "answer": {...}}

"summary" and "answer" are what the job's handler declares (BaseHandler.summarize): never the raw
input. A file that would pass its cap is renamed to .jsonl.1 (replacing the previous one) and a
new one started, so a worker never keeps more than twice the cap. Writing never fails a request:
a full disk or an unwritable folder drops the records and says so once per worker.

Set by `dlops serve` in TorchServe's environment (the handlers spell them here: they cannot import
serving/environment.py, whose names are the same):
    DLOPS_PREDICTION_LOG        the folder (unset: no log)
    DLOPS_PREDICTION_SAMPLE     the share of requests logged, 0..1 (0: no log)
    DLOPS_PREDICTION_LOG_MB     the cap of one worker's file before rotation
"""

from __future__ import annotations

import json
import logging
import os
import random
import socket
from pathlib import Path

log = logging.getLogger(__name__)
ROTATED_SUFFIX = ".1"


class PredictionLog:
    def __init__(self, folder: Path | None, *, sample: float, cap_bytes: int, model: str, version: str) -> None:
        self.sample = sample if folder is not None else 0.0
        self.cap_bytes = cap_bytes
        self.path = (
            (folder / model / (version or "unversioned") / f"predictions-{socket.gethostname()}-{os.getpid()}.jsonl")
            if folder
            else None
        )
        self.failed = False

    @classmethod
    def from_environment(cls, model: str, version: str) -> PredictionLog:
        folder, cap_mb = os.environ.get("DLOPS_PREDICTION_LOG"), float(os.environ.get("DLOPS_PREDICTION_LOG_MB") or 64)
        return cls(Path(folder) if folder else None, sample=float(os.environ.get("DLOPS_PREDICTION_SAMPLE") or 0),
                   cap_bytes=int(cap_mb * 2**20), model=model, version=version)  # fmt: skip

    @property
    def on(self) -> bool:
        return self.sample > 0

    def sampled(self) -> bool:
        """Whether this request goes into the log (each request drawn on its own)."""
        return self.on and random.random() < self.sample

    def append(self, records: list[dict]) -> None:
        """Append the records; on any OSError drop them (the request was answered already) and warn once."""
        if not records or self.path is None:
            return
        data = "".join(json.dumps(record, separators=(",", ":")) + "\n" for record in records).encode("utf-8")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            if self.path.exists() and self.path.stat().st_size + len(data) > self.cap_bytes:
                os.replace(self.path, self.path.with_name(self.path.name + ROTATED_SUFFIX))
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, data)
            finally:
                os.close(fd)
            self.failed = False
        except OSError as e:
            if not self.failed:
                log.warning("dlops prediction log %s cannot be written (%s): requests are answered as usual and "
                            "their records dropped until it can", self.path, e)  # fmt: skip
            self.failed = True
