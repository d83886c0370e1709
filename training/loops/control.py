"""The trainer's say between a loop's steps (the loops know no files, signals or clocks)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol


class StepControl(Protocol):
    """Checkpoints during long epochs, and stop requests."""

    def after_step(self, step: int, snapshot: Callable[[], dict[str, Any]]) -> bool:
        """Called after every optimizer step with the step's number in the epoch and a way to get
        the loop's state (what a resume continues from); True ends the epoch there."""
        ...
