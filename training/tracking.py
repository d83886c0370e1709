"""The one MLflow run lifecycle every job uses, with a TensorBoard writer beside it.

Default store: a SQLite database in ./mlruns/ with artifacts under ./mlruns/artifacts/, so a
single folder holds everything. MLFLOW_TRACKING_URI overrides it (another SQLite file, or an
MLflow server over HTTP).
"""

from __future__ import annotations

import os
import platform
import subprocess
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
import torch
import torchvision
from mlflow.entities import Run, RunStatus
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from torch.utils.tensorboard import SummaryWriter

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_STORE_DIR = Path("mlruns")
# Short runs would end before MLflow's default 10 s sampling logs anything.
SYSTEM_METRICS_INTERVAL_S = 2


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI when set, else the SQLite store in ./mlruns/."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    DEFAULT_STORE_DIR.mkdir(exist_ok=True)
    return f"sqlite:///{(DEFAULT_STORE_DIR / 'mlflow.db').resolve()}"


def _artifact_root(uri: str) -> str | None:
    """Keep a SQLite store's artifacts next to its database; servers choose their own."""
    if uri.startswith("sqlite:///"):
        return (Path(uri.removeprefix("sqlite:///")).parent / "artifacts").resolve().as_uri()
    return None


def store_client() -> MlflowClient:
    """A client of the configured store; the fluent API (mlflow.*) is pointed at it too."""
    mlflow.set_tracking_uri(tracking_uri())
    return MlflowClient()


def find_run(run_id: str) -> Run | None:
    """The run with this id in the configured store, or None."""
    try:
        return store_client().get_run(run_id)
    except MlflowException:
        return None


def ensure_experiment(name: str) -> str:
    """Id of the experiment called `name`, created on first use."""
    uri = tracking_uri()
    client = store_client()
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    root = _artifact_root(uri)
    location = f"{root}/{name}" if root else None
    try:
        return client.create_experiment(name, artifact_location=location)
    except MlflowException:  # created concurrently by another process
        return client.get_experiment_by_name(name).experiment_id


def _git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=5, check=True
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=PROJECT_ROOT,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
        return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment_tags(device_name: str) -> dict[str, str]:
    """Software and hardware facts that explain a run's numbers."""
    return {
        "torch_version": torch.__version__,
        "torchvision_version": torchvision.__version__,
        "cuda_version": str(torch.version.cuda),
        "device_name": device_name,
        "cpu_count": str(os.cpu_count()),
        "python_version": platform.python_version(),
        "hostname": platform.node(),
        "git_commit": _git_commit(),
    }


class RunTracker:
    """An active MLflow run plus the TensorBoard writer that mirrors its scalars."""

    def __init__(self, run_id: str):
        self.run_id = run_id
        self.client = MlflowClient()
        self.tensorboard_dir: Path | None = None
        self.writer: SummaryWriter | None = None

    def open_tensorboard(self, directory: Path) -> SummaryWriter:
        """Mirror every logged scalar into TensorBoard event files under `directory`."""
        self.tensorboard_dir = directory
        self.writer = SummaryWriter(str(directory))
        return self.writer

    def log_params(self, params: Mapping[str, Any]) -> None:
        mlflow.log_params({k: "None" if v is None else v for k, v in params.items()})

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        mlflow.set_tags({k: str(v) for k, v in tags.items()})

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        mlflow.log_metrics(dict(metrics), step=step)
        if self.writer:
            for name, value in metrics.items():
                self.writer.add_scalar(name, value, step)

    def logged_steps(self, metric: str) -> set[int]:
        return {m.step for m in self.client.get_metric_history(self.run_id, metric)}

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        mlflow.log_artifact(str(path), artifact_path)

    def log_text(self, text: str, artifact_file: str) -> None:
        mlflow.log_text(text, artifact_file)

    def sync_tensorboard(self) -> None:
        """Flush the event files and copy them into the run, so a crash loses at most one epoch."""
        if self.writer and self.tensorboard_dir:
            self.writer.flush()
            mlflow.log_artifacts(str(self.tensorboard_dir), "tensorboard")

    def close(self) -> None:
        if self.writer:
            self.sync_tensorboard()
            self.writer.close()
            self.writer = None


@contextmanager
def start_run(
    experiment: str,
    run_name: str | None = None,
    resume_run_id: str | None = None,
    tags: Mapping[str, str] | None = None,
    system_metrics: bool = True,
) -> Iterator[RunTracker]:
    """Start a new run, or continue `resume_run_id`; end it FINISHED, FAILED or KILLED."""
    experiment_id = ensure_experiment(experiment)
    if "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL" not in os.environ:
        mlflow.set_system_metrics_sampling_interval(SYSTEM_METRICS_INTERVAL_S)
    if resume_run_id:
        if find_run(resume_run_id) is None:
            raise MlflowException(
                f"run {resume_run_id} named in the checkpoint is not in the tracking store {tracking_uri()}"
            )
        mlflow.start_run(run_id=resume_run_id, log_system_metrics=system_metrics)
    else:
        mlflow.start_run(
            experiment_id=experiment_id, run_name=run_name, tags=dict(tags or {}), log_system_metrics=system_metrics
        )
    tracker = RunTracker(mlflow.active_run().info.run_id)
    status = RunStatus.FINISHED
    try:
        yield tracker
    except KeyboardInterrupt:
        status = RunStatus.KILLED
        raise
    except BaseException:
        status = RunStatus.FAILED
        raise
    finally:
        try:
            tracker.close()
        finally:
            mlflow.end_run(RunStatus.to_string(status))


def register_model(run_id: str, artifact_path: str, name: str, tags: Mapping[str, str] | None = None) -> str:
    """Register an artifact folder of a run as a new version of model `name`; return the version."""
    client = MlflowClient()
    try:
        client.create_registered_model(name)
    except MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    source = f"{client.get_run(run_id).info.artifact_uri}/{artifact_path}"
    version = client.create_model_version(name, source=source, run_id=run_id, tags=dict(tags or {}))
    return version.version


def log_text_to_run(run_id: str, text: str, artifact_file: str) -> bool:
    """Add a text artifact to an existing run (its status untouched); False when the store lacks the run."""
    if find_run(run_id) is None:
        return False
    store_client().log_text(run_id, text, artifact_file)
    return True


class NullTracker(RunTracker):
    """Stands in for the run on processes that do not log (ranks other than 0)."""

    def __init__(self) -> None:
        self.run_id = ""
        self.tensorboard_dir = None
        self.writer = None

    def open_tensorboard(self, directory: Path) -> None:
        return None

    def log_params(self, params: Mapping[str, Any]) -> None:
        pass

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        pass

    def logged_steps(self, metric: str) -> set[int]:
        return set()

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        pass

    def log_text(self, text: str, artifact_file: str) -> None:
        pass

    def sync_tensorboard(self) -> None:
        pass
