"""Checkpoint I/O shared by every job: atomic writes, weights-only loads, RNG state.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts, so that
`torch.load(weights_only=True)` can read it without trusting pickled code.
"""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable or of the wrong kind."""


def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    """Write `state` to `path` atomically: a crash leaves the old file or the new one, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_checkpoint(path: Path | str, kind: str | None = None) -> dict[str, Any]:
    """Load a checkpoint onto the CPU with weights_only=True; check its kind when given."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for corrupt or foreign files
        raise CheckpointError(f"checkpoint {path} cannot be read: {e}") from e
    if not isinstance(state, dict) or "kind" not in state:
        raise CheckpointError(f"checkpoint {path} was not written by dlops (no 'kind' entry)")
    if kind is not None and state["kind"] != kind:
        raise CheckpointError(f"checkpoint {path} holds a {state['kind']!r} model, expected {kind!r}")
    return state


def rng_state() -> dict[str, Any]:
    """Every RNG a training run draws from, in a weights_only-loadable form."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": list(random.getstate()[1]),
        "python_version": random.getstate()[0],
        "numpy": torch.from_numpy(keys.astype(np.int64)),
        "numpy_pos": int(pos),
        "numpy_gauss": (int(has_gauss), float(gauss)),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    random.setstate((state["python_version"], tuple(state["python"]), None))
    has_gauss, gauss = state["numpy_gauss"]
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"], has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def config_for_resume(saved: dict[str, Any], given: dict[str, Any], changeable: set[str]) -> dict[str, Any]:
    """The saved run's options with the explicitly given ones applied, where changing them is safe.

    A resumed run continues the same MLflow run, whose params are fixed: changing, say, the
    learning rate would make the run lie about how it was trained.
    """
    refused = {k: v for k, v in given.items() if k not in changeable and saved.get(k) != v}
    if refused:
        listed = ", ".join(f"--{k.replace('_', '-')} (run used {saved.get(k)!r})" for k in sorted(refused))
        allowed = ", ".join(f"--{k.replace('_', '-')}" for k in sorted(changeable))
        raise CheckpointError(f"cannot change {listed} when resuming; only {allowed} may change")
    return {**saved, **given}
