"""Bounded load on a served model, for the tests, bench/canary.py and scripts/docker_check.py: requests
from `concurrency` threads until stopped (or `max_requests`), every answer kept with when it was sent,
how long it took, its status and the version and worker that answered."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import NamedTuple

from serving.client import VERSION_HEADER, WORKER_HEADER, Answer


class Sample(NamedTuple):
    sent: float  # Unix time
    seconds: float
    status: int  # -1: no answer (refused, reset, timed out)
    version: str | None
    worker: str | None


class Load:
    """`send()` (one request, its Answer) called from `concurrency` threads while the `with` block runs."""

    def __init__(self, send: Callable[[], Answer], concurrency: int = 8, max_requests: int = 20_000):
        self.send, self.max_requests = send, max_requests
        self.samples: list[Sample] = []
        self.stopping = threading.Event()
        self.threads = [threading.Thread(target=self._loop, daemon=True) for _ in range(concurrency)]

    def _loop(self) -> None:
        while not self.stopping.is_set() and len(self.samples) < self.max_requests:
            sent = time.time()
            try:
                answer = self.send()
                status, version = answer.status, answer.headers.get(VERSION_HEADER)
                worker = answer.headers.get(WORKER_HEADER)
            except OSError:
                status, version, worker = -1, None, None
            self.samples.append(Sample(sent, time.time() - sent, status, version, worker))

    def window(self, start: float, end: float) -> list[Sample]:
        return [s for s in self.samples if start <= s.sent < end]

    def __enter__(self) -> Load:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join(timeout=130)
