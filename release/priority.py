"""A new version's workers start at the lowest CPU priority, so the version that serves keeps the CPU.

A deploy starts the new version's workers while the old ones answer requests: each new worker
starts Python, imports torch, loads the weights and runs its first request, seconds of CPU that
on a small machine come out of the serving workers' share (on 2 cores the p99 latency rose from
tens of milliseconds to seconds during a deploy: docs/benchmarks.md). While a deploy registers and
checks the new version, this watches the server's process for the new worker processes and sets
every thread of each to nice 19 as soon as it appears; once the version has answered its check,
and before it answers anyone, each goes back to the priority it had.

Linux keeps a nice value per thread, and lowering one is allowed to anyone but raising it back
needs root or CAP_SYS_NICE: without either, nothing is lowered (a worker left at nice 19 would
serve at it) and the deploy says so. Nothing is done either when the server's processes are not
this machine's own (a server in a container, whose process ids are the container's).
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import psutil

LOWEST = 19
WORKER_MARK = "model_service_worker"  # TorchServe's Python worker: ts/model_service_worker.py
SERVER_MARK = "org.pytorch.serve.ModelServer"  # its Java frontend, the workers' parent
CAP_SYS_NICE = 23
POLL_S = 0.02


def may_raise_priority() -> bool:
    """Whether this process may give a thread its priority back (root, or CAP_SYS_NICE)."""
    if os.geteuid() == 0:
        return True
    status = Path("/proc/self/status")
    effective = next((line.split()[1] for line in status.read_text().splitlines() if line.startswith("CapEff:")),
                     "0") if status.exists() else "0"  # fmt: skip
    return bool(int(effective, 16) >> CAP_SYS_NICE & 1)


def _workers(server: psutil.Process) -> set[int]:
    found = set()
    for child in server.children(recursive=True):
        try:
            if any(WORKER_MARK in part for part in child.cmdline()):
                found.add(child.pid)
        except psutil.Error:  # it ended meanwhile
            continue
    return found


def local_server(pid: int | None) -> psutil.Process | None:
    """The TorchServe frontend of process id `pid` when it is this machine's own process, else None."""
    if pid is None:
        return None
    try:
        server = psutil.Process(pid)
        return server if any(SERVER_MARK in part for part in server.cmdline()) else None
    except psutil.Error:
        return None


class StartingWorkers:
    """Lower the priority of the workers the server starts from now on; `restore()` gives it back."""

    def __init__(self, server: psutil.Process):
        self.server = server
        self.before = _workers(server)
        self.lowered: dict[int, int] = {}  # worker process id -> its nice value before
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._watch, name="dlops-deploy-priority", daemon=True)
        self.count = 0  # workers lowered, once restored

    def __enter__(self) -> StartingWorkers:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.count = self.restore()

    def _watch(self) -> None:
        while not self.stopping.is_set():
            for pid in _workers(self.server) - self.before:
                self._lower(pid)
            self.stopping.wait(POLL_S)

    def _lower(self, pid: int) -> None:
        """Every thread of worker `pid` to the lowest priority (threads it starts later inherit it)."""
        try:
            threads = [t.id for t in psutil.Process(pid).threads()]
            self.lowered.setdefault(pid, os.getpriority(os.PRIO_PROCESS, pid))
        except (psutil.Error, OSError):  # it ended meanwhile
            return
        for tid in threads:
            try:
                os.setpriority(os.PRIO_PROCESS, tid, LOWEST)
            except OSError:  # the thread ended meanwhile
                continue

    def restore(self) -> int:
        """Stop watching; give every thread of each lowered worker the priority the worker had; return
        how many workers were lowered."""
        self.stopping.set()
        if self.thread.is_alive():
            self.thread.join()
        for pid, nice in self.lowered.items():
            try:
                threads = [t.id for t in psutil.Process(pid).threads()]
            except psutil.Error:  # ended, or restarted by TorchServe
                continue
            for tid in threads:
                try:
                    os.setpriority(os.PRIO_PROCESS, tid, nice)
                except OSError:
                    continue
        lowered = len(self.lowered)
        self.lowered.clear()
        return lowered
