"""Checkpoint I/O shared by every job: atomic writes, weights-only loads, RNG state, one schema.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts, so that
`torch.load(weights_only=True)` can read it without trusting pickled code. Schema (version 2):

    format_version, kind, epoch, run_id, experiment
    model            the state dict          model_config   what the job's build_model takes
    <inference keys> what inference needs beside the weights, declared by the job
                     (resnet: classes, labels, image_size, normalization; lm: vocab, window)
    optimizer, scheduler, scaler, rng, train_state, job_state     everything a resume restores
    metrics          the epoch's metrics     config         every option of the run

Version 1 (written until 2026-11) is read and converted; any other version is refused.
"""

from __future__ import annotations

import hashlib
import os
import random
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

FORMAT_VERSION = 2


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


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file's bytes (a checkpoint's identity across upload and download)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_checkpoint(path: Path | str, kind: str | None = None) -> dict[str, Any]:
    """Load a checkpoint onto the CPU with weights_only=True; check its kind when given."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for corrupt or foreign files
        raise CheckpointError(
            f"{path} is not a checkpoint dlops can read: expected a .pt file written by "
            f"`dlops train` (runs/<run id>/last.pt or best.pt); {_load_error(e)}"
        ) from e
    if not isinstance(state, dict) or "kind" not in state:
        raise CheckpointError(f"checkpoint {path} was not written by dlops (no 'kind' entry)")
    version = state.get("format_version")
    if version == 1:
        state = upgrade_v1(state)
    elif version != FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {path} has format_version {version!r}; this dlops reads versions 1 and {FORMAT_VERSION} "
            "(was it written by a newer dlops?)"
        )
    if kind is not None and state["kind"] != kind:
        raise CheckpointError(f"checkpoint {path} holds a {state['kind']!r} model, expected {kind!r}")
    return state


def _load_error(error: Exception) -> str:
    """torch.load's reason in one line (its weights_only message is a page of advice; the reason is in it)."""
    text = str(error)
    if "WeightsUnpickler error:" in text:
        reason = text.split("WeightsUnpickler error:", 1)[1].strip().splitlines()[0]
        return f"torch.load(weights_only=True) refused it ({reason}): not a torch file, or one holding code objects"
    return f"torch.load said: {text.strip().splitlines()[0] if text.strip() else type(error).__name__}"


# kind -> that job's reading of its version-1 checkpoints: (model_config, best value, job state,
# entries to add), from each JobSpec's upgrade_v1 as the jobs are found (training/jobs/__init__.py),
# so nothing here knows a job.
V1_CONVERSIONS: dict[str, Callable[[dict[str, Any]], tuple[dict, float, dict, dict]]] = {}


def upgrade_v1(state: dict[str, Any]) -> dict[str, Any]:
    """A version-1 checkpoint in version 2's schema (the weights and every resume state kept)."""
    old = state["train_state"]
    convert = V1_CONVERSIONS.get(state["kind"])
    if convert is None:
        raise CheckpointError(f"a version-1 checkpoint of kind {state['kind']!r}, which no installed job reads "
                              "(its JobSpec declares no upgrade_v1)")  # fmt: skip
    model_config, best_value, job_state, extra = convert(state)
    train_state = {
        "epoch": old["epoch"],
        "best_value": best_value,
        "best_epoch": old["best_epoch"],
        "best_val_loss": old["best_val_loss"],
        "epochs_since_improvement": old.get("epochs_since_improvement", 0),
        "train_seconds": old["train_seconds"],
        "seconds_to_best": old.get("seconds_to_best", 0.0),
    }
    return {**state, **extra, "format_version": FORMAT_VERSION, "model_config": model_config,
            "train_state": train_state, "job_state": job_state}  # fmt: skip


INFERENCE_ENTRIES = ("format_version", "kind", "epoch", "run_id", "experiment", "model", "model_config", "metrics")


def inference_checkpoint(state: dict[str, Any], inference_keys: tuple[str, ...]) -> dict[str, Any]:
    """The part of a checkpoint that inference needs: weights, model config, the job's inference
    entries (class names, vocabulary...) and where it came from; no optimizer or resume state.
    It loads like any checkpoint (the registry's MLflow models hold one)."""
    return {key: state[key] for key in (*INFERENCE_ENTRIES, *inference_keys) if key in state}


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


def restorable_cuda_states(saved: list[torch.Tensor], visible: int) -> list[torch.Tensor]:
    """The per-GPU RNG states a process can restore: a run saved on 8 GPUs may resume on 1."""
    return list(saved[:visible])


def restore_rng_state(state: dict[str, Any]) -> None:
    random.setstate((state["python_version"], tuple(state["python"]), None))
    has_gauss, gauss = state["numpy_gauss"]
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"], has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        for index, cuda_state in enumerate(restorable_cuda_states(state["cuda"], torch.cuda.device_count())):
            torch.cuda.set_rng_state(cuda_state, index)


def process_seed(seed: int, rank: int = 0, epoch: int = 0) -> int:
    """The seed of one process at the start of `epoch`: each DDP rank draws its own crops and flips
    (rank 0 of a new run keeps `seed`, so a single process seeds as it always did)."""
    return seed + 1_000_003 * rank + 7_919 * epoch


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


def copy_matching(model: nn.Module, weights: dict[str, torch.Tensor]) -> list[str]:
    """Copy every tensor whose name and shape match; return the names of the model's tensors left as they were."""
    own = model.state_dict()
    matching = {k: v for k, v in weights.items() if k in own and own[k].shape == v.shape}
    model.load_state_dict(matching, strict=False)
    return sorted(k for k in own if k not in matching)
