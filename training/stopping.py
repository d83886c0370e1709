"""Stopping is normal: SIGTERM and SIGINT become a request the training loop honours between steps.

SIGTERM is how `docker stop`, Kubernetes, SLURM and preemptible VMs stop a job, with a grace
period (30 s or more) before SIGKILL. While training, the first SIGTERM or SIGINT only sets a
flag: the loop finishes the step it is in, the trainer writes a resumable checkpoint of where it
stands (mid-epoch), ends the MLflow run KILLED with the reason, and the process exits with
128 + the signal number (143 for SIGTERM, 130 for SIGINT), as shells report a death by signal.
A second signal, a second or more after the first, stops at once, the default way. (Ctrl-C under
torchrun reaches a worker twice at once: from the terminal, and forwarded by torchrun.)

Under DDP every rank must stop at the same step (or the others wait for it in their next
all-reduce until the timeout): `agreed()` reduces the flag across processes every step.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

import psutil
import torch
import torch.distributed as dist

HANDLED = (signal.SIGTERM, signal.SIGINT)
STOPPED_BY_SIGNAL = tuple(128 + signum for signum in HANDLED)  # how a run these stopped exits (143, 130)
REPEAT_S = 1.0  # a signal this soon after the first is the same request (torchrun forwards what a worker got)


class TrainingStopped(KeyboardInterrupt):  # an interruption, as Ctrl-C is: `except Exception` lets it through
    """A run stopped by a signal, after writing its resumable checkpoint."""

    def __init__(self, signum: int, checkpoint: str, where: str):
        self.signum, self.checkpoint, self.where = signum, checkpoint, where
        super().__init__(f"stopped by {signal.Signals(signum).name} {where}; checkpoint {checkpoint}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class NodeLost(TrainingStopped):
    """A peer process, or a whole node, died under a collective: the run ends KILLED and resumable, and this
    process exits 1, so that torchrun restarts the group (--max-restarts) or gives up."""

    def __init__(self, checkpoint: str, where: str):
        KeyboardInterrupt.__init__(self, f"a peer process or node was lost {where}; checkpoint {checkpoint}")
        self.signum, self.checkpoint, self.where = 0, checkpoint, where

    @property
    def exit_code(self) -> int:
        return 1


class StopRequest:
    """Set by SIGTERM/SIGINT (or `request()`); the loop asks `requested` (one process) or `agreed`."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.at = 0.0  # when the first signal came

    def request(self, signum: int = signal.SIGTERM) -> None:
        self.signum = signum

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""

    def agreed(self, device: torch.device, *, distributed: bool) -> bool:
        """Whether any process was asked to stop: the same answer on every rank (one all-reduce)."""
        if not distributed:
            return self.requested
        flag = torch.tensor([self.signum or 0], dtype=torch.int64, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() and not self.requested:
            self.signum = int(flag.item())
        return bool(flag.item())

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested:
            if time.monotonic() - self.at >= REPEAT_S:  # a second signal: stop now
                signal.signal(signum, signal.SIG_DFL)
                signal.raise_signal(signum)
            return
        self.signum, self.at = signum, time.monotonic()
        print(f"\n=> {signal.Signals(signum).name}: finishing this step, then writing a resumable checkpoint "
              "(send it again to stop at once)", flush=True)  # fmt: skip


@contextmanager
def stop_on_signals() -> Iterator[StopRequest]:
    """Turn SIGTERM and SIGINT into a StopRequest while the block runs (the main thread only: signal
    handlers cannot be set elsewhere, so a run started from another thread stops the default way)."""
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return
    previous = {s: signal.signal(s, request._handle) for s in HANDLED}
    try:
        yield request
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def exit_now(code: int) -> None:
    """Exit a stopped run's process without the interpreter's seconds of teardown (its state is on
    disk), DataLoader workers stopped first: they would notice the orphaning only at their next
    check, seconds later, keeping the job alive."""
    children = psutil.Process().children(recursive=True)
    for child in children:
        child.terminate()
    psutil.wait_procs(children, timeout=3)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
