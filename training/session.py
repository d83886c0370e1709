"""A training run's lifecycle, shared by every job: one MLflow run, one run directory, checkpoints.

    with training_session(config, "resnet", saved, resume, device, tags) as session:
        ...each epoch: session.save_epoch(state, improved); session.run.log_metrics(...)
        session.publish(model_name, tags, curves)  # learning curves, best/last checkpoints, register best

A new run logs every option as a param and the environment as tags; a resumed run (checkpoint of
an interrupted one) continues the same MLflow run and the same directory.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from training import tracking
from training.checkpoint import load_checkpoint, save_checkpoint
from training.devices import DeviceChoice
from training.plots import learning_curves


@dataclasses.dataclass
class TrainingSession:
    run: tracking.RunTracker
    run_dir: Path
    active: bool = True  # False on processes other than rank 0: they neither log nor write checkpoints

    @property
    def last(self) -> Path:
        return self.run_dir / "last.pt"

    @property
    def best(self) -> Path:
        return self.run_dir / "best.pt"

    def save_epoch(self, state: dict[str, Any], improved: bool) -> None:
        """Write last.pt (and best.pt when the epoch improved) before its metrics are logged."""
        if not self.active:
            return
        state = {**state, "run_id": self.run.run_id}
        save_checkpoint(state, self.last)
        if improved:
            save_checkpoint(state, self.best)
        print(f"=> epoch saved to {self.last}" + (" (new best)" if improved else ""), flush=True)

    def catch_up(self, saved: dict[str, Any], metric: str) -> None:
        """Log the saved epoch's metrics if the process died between checkpoint and logging."""
        epoch = saved["epoch"]
        if epoch not in self.run.logged_steps(metric):
            self.run.log_metrics(saved["metrics"], step=epoch)

    def publish(self, model_name: str, tags: dict[str, str], curves: dict[str, list[str]]) -> str | None:
        """Log the learning curves and both checkpoints, register best.pt; return the registered version."""
        if not self.active:
            return None
        picture = learning_curves(self.run.run_id, curves, self.run_dir / "learning_curves.png", model_name)
        self.run.log_artifact(picture)
        for path in (self.best, self.last):
            if path.exists():
                self.run.log_artifact(path, "checkpoints")
        if not self.best.exists():
            return None
        version = tracking.register_model(self.run.run_id, "checkpoints/best.pt", model_name, tags=tags)
        self.run.set_tags({"registered_model": f"{model_name}/{version}"})
        print(f"=> registered {model_name} version {version} ({', '.join(f'{k} {v}' for k, v in tags.items())})")
        return version


def load_resume(path: Path | None, kind: str) -> dict[str, Any] | None:
    return load_checkpoint(path, kind=kind) if path else None


@contextmanager
def training_session(
    config: Any,
    kind: str,
    saved: dict[str, Any] | None,
    resume: Path | None,
    device: DeviceChoice,
    tags: dict[str, Any],
    params: dict[str, Any] | None = None,
    active: bool = True,
) -> Iterator[TrainingSession]:
    """Start (or continue, when `saved` is a checkpoint) the MLflow run of a `kind` training job.

    `params` are logged beside the config's fields; `active=False` (ranks other than 0) yields a
    session that logs and writes nothing.
    """
    if not active:
        yield TrainingSession(tracking.NullTracker(), Path(config.out_dir), active=False)
        return
    with tracking.start_run(
        config.experiment,
        run_name=config.run_name,
        resume_run_id=saved["run_id"] if saved else None,
        tags={"job": f"train-{kind}"},
    ) as run:
        run_dir = Path(resume).parent if saved and resume else Path(config.out_dir) / run.run_id
        run_dir.mkdir(parents=True, exist_ok=True)
        run.open_tensorboard(run_dir / "tensorboard")
        if saved:
            run.set_tags({"resumed_after_epoch": saved["epoch"]})
            print(f"=> resuming run {run.run_id} after epoch {saved['epoch']} from {resume}")
        else:
            run.log_params({**dataclasses.asdict(config), **device.features(), **(params or {})})
            run.set_tags(
                {
                    **tracking.environment_tags(device.name),
                    "device": str(device.device),
                    "device_reason": device.reason,
                    **tags,
                }
            )
        print(f"=> MLflow run {run.run_id}; checkpoints and TensorBoard logs in {run_dir}", flush=True)
        yield TrainingSession(run, run_dir)
