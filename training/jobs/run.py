"""What one run of a job builds and does: its data, model config, optimizer, and one epoch of
training and of validation. The trainer (training/trainer.py) drives it, the same for every job:

    run = spec.run(spec=spec, config=config, runtime=runtime)
    tags = run.build_data()
    model = spec.build_model(**run.model_config())
    optimization = run.build_optimization(model, run.steps_per_epoch())
    for each epoch: run.before_epoch -> run.train_epoch -> run.evaluate -> run.after_epoch
    final = run.finish(model, best_checkpoint)

A run implements the six abstract methods; every other method is a hook with a default. Values
serving needs (a classifier's class names, an LM's vocabulary) are attributes of the run named by
the spec's Serving.inference_keys: the checkpoint stores them, the handler reads them.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from training.jobs.config import RunConfig
from training.loops.control import StepControl
from training.metrics import EPOCH_SECONDS, TRAIN_LOSS, VAL_LOSS
from training.runtime import Runtime

if TYPE_CHECKING:
    from training.jobs.spec import JobSpec


@dataclass(kw_only=True)
class Optimization:
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
    scheduler_per_batch: bool = False  # one-cycle steps every batch, the others every epoch


@dataclass(frozen=True, kw_only=True)
class EpochContext:
    """What a run's train_epoch gets from the trainer."""

    epoch: int
    optimization: Optimization
    scaler: torch.amp.GradScaler
    log_step: Callable[[dict[str, float], int], None]  # metrics at a global step (skipped if already logged)
    reduce: Callable[[torch.Tensor], torch.Tensor] | None  # sum over DDP processes, or None
    control: StepControl | None = None  # pass to the loop: checkpoints within the epoch, stop requests
    resume: dict[str, Any] | None = None  # the loop's state where a stopped epoch left off (its "step")


def plain(value: Any) -> Any:
    """A value a checkpoint loads with weights_only=True and a handler reads as JSON: tensors as lists."""
    return value.tolist() if isinstance(value, torch.Tensor) else value


class JobRun(abc.ABC):
    """One run of a job. `self.config` is the run's config from here on: a run may derive it
    (dataclasses.replace) as it resolves values (the dataset's augmentation...); the trainer logs and
    checkpoints this one."""

    def __init__(self, *, spec: JobSpec, config: RunConfig, runtime: Runtime):
        self.spec, self.config, self.runtime = spec, config, runtime

    @property
    def device(self) -> torch.device:
        return self.runtime.device

    # --- what every run implements -------------------------------------------------------------------
    @abc.abstractmethod
    def build_data(self) -> dict[str, Any]:
        """Load the data; return run tags describing it (dataset path, sizes...)."""

    @abc.abstractmethod
    def model_config(self) -> dict[str, Any]:
        """The keywords of spec.build_model; stored in every checkpoint."""

    @abc.abstractmethod
    def example_input(self) -> torch.Tensor:
        """One input as the model sees it, for the layer table."""

    @abc.abstractmethod
    def build_optimization(self, model: nn.Module, steps_per_epoch: int) -> Optimization: ...

    @abc.abstractmethod
    def train_epoch(self, model: nn.Module, context: EpochContext) -> dict[str, float]:
        """One epoch of training; its metrics (train/loss among them)."""

    @abc.abstractmethod
    def evaluate(self, model: nn.Module, reduce: Callable | None) -> dict[str, float]:
        """Validation metrics of one epoch: val/loss (early stopping) and the spec's metrics."""

    # --- hooks, with what most jobs want ----------------------------------------------------------------
    def prepare_model(self, model: nn.Module) -> nn.Module:
        """Last touches before training (memory format...)."""
        return model

    def pretrain(self, model: nn.Module) -> dict[str, Any]:
        """Start a fresh `model` from published weights where the config asks; return run params saying so."""
        return {}

    def check_warm_start(self, source: dict[str, Any]) -> None:  # noqa: B027 - a hook, empty by default
        """Refuse --init-from a checkpoint whose weights mean something else (raise ValueError)."""

    def steps_per_epoch(self) -> int:
        return 1

    def before_epoch(self, epoch: int, optimization: Optimization) -> None:  # noqa: B027 - a hook, empty by default
        """Per-epoch set-up (the learning rate...)."""

    def after_epoch(self, *, improved: bool) -> None:  # noqa: B027 - a hook, empty by default
        """Per-epoch bookkeeping after validation (e.g. anneal the learning rate)."""

    def epoch_line(self, epoch: int, metrics: dict[str, float]) -> str:
        """The epoch's console line: losses, the declared metrics, the time."""
        shown = [TRAIN_LOSS, VAL_LOSS.name, *(m.name for m in self.spec.metrics)]
        values = " | ".join(f"{name} {metrics[name]:.4f}" for name in dict.fromkeys(shown) if name in metrics)
        return f"=> epoch {epoch}/{self.config.epochs}: {values} | {metrics.get(EPOCH_SECONDS, 0):.1f} s"

    def finish(self, model: nn.Module, best: Path) -> dict[str, float]:
        """After the last epoch (e.g. the test split with the best weights); return final metrics."""
        return {}

    def run_params(self) -> dict[str, Any]:
        """Params beyond the config (resolved values such as the per-process batch size)."""
        return {}

    def registry_tags(self, best_value: float, best_epoch: int, final: dict[str, float]) -> dict[str, str]:
        return {self.spec.best.name.replace("/", "_"): f"{best_value:.3f}", "epoch": str(best_epoch)}

    def inference_meta(self) -> dict[str, Any]:
        """What serving needs beside the weights: the run's attributes named by the spec's inference keys."""
        keys = self.spec.serving.inference_keys if self.spec.serving else ()
        missing = [key for key in keys if not hasattr(self, key)]
        if missing:
            raise AttributeError(f"the {self.spec.kind} run has no {', '.join(missing)}: its Serving.inference_keys "
                                 "name attributes the run sets (in build_data)")  # fmt: skip
        return {key: plain(getattr(self, key)) for key in keys}

    # what survives a resume besides the model, optimizer and RNG
    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:  # noqa: B027 - a hook, empty by default
        pass
