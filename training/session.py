"""A training run's lifecycle, shared by every job: one MLflow run, one run directory, checkpoints.

    with training_session(config, kind, saved, resume=..., device=..., tags=..., params=...) as session:
        ...each epoch: session.save_epoch(state, improved); session.run.log_metrics(...)
        session.publish(model_name, tags, spec, best_epoch)  # learning curves, checkpoints, register best

A new run logs every option as a param and the environment as tags; a resumed run (checkpoint of
an interrupted one) continues the same MLflow run and the same directory. Everything is logged
through the run's journal (training/tracking/run.py): nothing here waits for the tracking server.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from training import tracking
from training.checkpoint import inference_checkpoint, load_checkpoint, save_checkpoint
from training.devices import DeviceChoice
from training.jobs.serving import HANDLERS
from training.jobs.spec import JobSpec
from training.plots import learning_curves
from training.tracking.artifacts import (
    BEST,
    BEST_ARTIFACT,
    CHECKPOINTS,
    LAST,
    LEARNING_CURVES,
    MLFLOW_MODEL,
    MONITORING,
    REFERENCE_PROFILE,
    TENSORBOARD,
)
from training.tracking.journal import write_atomic
from training.tracking.registry import CHECKPOINT_ARTIFACT, digest_tag, save_mlflow_model
from training.tracking.tags import JOB_TAG, STOP_REASON, training_job

LAST_NOTE = "last.json"


def find_resumable(
    out_dir: Path, kind: str, run_name: str | None = None, *, rendezvous: str | None = None
) -> Path | None:
    """The newest last.pt under `out_dir` of an unfinished `kind` run named `run_name` (`--resume auto`), or,
    given `rendezvous`, of the run of that torchrun rendezvous id (a restarted process group)."""
    found = []
    for note_path in Path(out_dir).glob(f"*/{LAST_NOTE}"):
        try:
            note = json.loads(note_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            continue
        last = note_path.with_name(LAST)
        same = note.get("rendezvous") == rendezvous if rendezvous else note.get("run_name") == run_name
        if note.get("kind") == kind and same and not note.get("finished") and last.is_file():
            found.append((note.get("time", 0), last))
    return max(found)[1] if found else None


def end_lost_run(out_dir: Path, kind: str, rendezvous: str) -> None:
    """After torchrun gave up on a node group (a node lost for good): the run ends KILLED (its survivors may
    have ended it already; not if rank 0's node was the one lost), saying how to resume it."""
    last = find_resumable(out_dir, kind, rendezvous=rendezvous)
    if last is None:
        return
    how = (f"resumable from {last}: the same command on every node (the same --rdzv-id {rendezvous}) continues "
           "the run")  # fmt: skip
    if tracking.end_abandoned(last.parent, {STOP_REASON: f"the node group gave up after losing a node; {how}"}):
        print(f"=> the node group gave up; run {last.parent.name} ended KILLED, {how}", flush=True)


def build_mlflow_model(job: JobSpec, checkpoint: Path, directory: Path) -> Path:
    """The MLflow pyfunc model of a job's checkpoint, saved to `directory`: the inference part of
    the checkpoint, the job's handler and model code, and its example request as input example."""
    serving = job.serving
    state = inference_checkpoint(load_checkpoint(checkpoint, kind=job.kind), serving.inference_keys)
    example = serving.example_request(state)
    with tempfile.TemporaryDirectory() as tmp:  # the model keeps its own copy, artifacts/checkpoint.pt
        weights = Path(tmp) / f"{CHECKPOINT_ARTIFACT}.pt"
        save_checkpoint(state, weights)
        return save_mlflow_model(directory, python_model=HANDLERS / "mlflow_model.py", checkpoint=weights,
                                 code=serving.files(), handler=serving.handler, handler_class=serving.handler_class,
                                 example=example, answer=serving.answer(state, example))  # fmt: skip


def reference_profile(job: JobSpec, checkpoint: Path, folder: Path) -> Path | None:
    """The reference profile of a version about to be registered: requests made from its validation data,
    summarized by the job's handler as it summarizes served requests (the drift checks' baseline). None
    (said why) when the job declares no monitoring or its data is not there any more."""
    monitoring = job.serving.monitoring if job.serving else None
    if monitoring is None:
        return None
    state = load_checkpoint(checkpoint, kind=job.kind)
    try:
        requests = monitoring.reference_requests(state, monitoring.reference_size)
    except (OSError, ValueError) as e:  # DatasetError is a ValueError
        print(f"=> no reference profile for drift checks ({e}): `dlops monitor drift` cannot judge this version")
        return None
    summaries = job.serving.profile(inference_checkpoint(state, job.serving.inference_keys), requests)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / REFERENCE_PROFILE
    write_atomic(path, "".join(json.dumps(summary, separators=(",", ":")) + "\n" for summary in summaries))
    print(f"=> reference profile for drift checks: {len(summaries)} validation requests summarized ({path})")
    return path


@dataclasses.dataclass(kw_only=True)
class TrainingSession:
    run: tracking.RunTracker
    run_dir: Path
    active: bool = True  # False on processes other than rank 0: they neither log nor write checkpoints
    rendezvous: str | None = None  # torchrun's rendezvous id: a restarted process group finds the run by it
    registering: str | None = None

    @property
    def last(self) -> Path:
        return self.run_dir / LAST

    @property
    def best(self) -> Path:
        return self.run_dir / BEST

    def save_epoch(self, state: dict[str, Any], *, improved: bool) -> None:
        """Write last.pt (and best.pt when the epoch improved) before its metrics are logged."""
        if not self.active:
            return
        state = {**state, "run_id": self.run.run_id}
        save_checkpoint(state, self.last)
        self._note_last(state)
        if improved:
            save_checkpoint(state, self.best)
        print(f"=> epoch saved to {self.last}" + (" (new best)" if improved else ""), flush=True)

    def save_position(self, state: dict[str, Any]) -> Path | None:
        """Write a resumable last.pt within an epoch (state["position"]: the epoch, step and loop
        state), replacing the previous one atomically; best.pt is only ever an epoch's end."""
        if not self.active:
            return None
        state = {**state, "run_id": self.run.run_id}
        save_checkpoint(state, self.last)
        self._note_last(state)
        position = state["position"]
        print(f"=> epoch {position['epoch']} step {position['step']} saved to {self.last} (resumable)", flush=True)
        return self.last

    def _note_last(self, state: dict[str, Any], *, finished: bool = False) -> None:
        """last.json beside last.pt: what `--resume auto` looks for without loading checkpoints."""
        position = state.get("position") or {}
        note = {"kind": state["kind"], "run_name": state["config"].get("run_name"), "run_id": self.run.run_id,
                "rendezvous": self.rendezvous,
                "epoch": state["epoch"], "position": {"epoch": position.get("epoch"), "step": position.get("step")},
                "finished": finished, "time": time.time()}  # fmt: skip
        write_atomic(self.run_dir / LAST_NOTE, json.dumps(note, indent=1))

    def mark_finished(self) -> None:
        """The run is complete: `--resume auto` starts a new one rather than continuing it."""
        if self.active and (self.run_dir / LAST_NOTE).is_file():
            note = json.loads((self.run_dir / LAST_NOTE).read_text(encoding="utf-8"))
            write_atomic(
                self.run_dir / LAST_NOTE, json.dumps({**note, "finished": True, "time": time.time()}, indent=1)
            )

    def catch_up(self, saved: dict[str, Any], metric: str) -> None:
        """Log the saved epoch's metrics if the process died between checkpoint and logging."""
        epoch = saved["epoch"]
        if epoch and saved.get("metrics") and epoch not in self.run.logged_steps(metric):
            self.run.log_metrics(saved["metrics"], step=epoch)

    def publish(self, model_name: str | None, tags: dict[str, str], job: JobSpec, best_epoch: int) -> None:
        """Log the learning curves and both checkpoints; register best.pt as a version of `model_name`
        (unless None) once it is delivered: as an MLflow model where the job has one (its handler
        class), else the checkpoint file itself."""
        if not self.active:
            return
        title = model_name or self.run.run_id
        picture = learning_curves(self.run.metric_history, job.panels, self.run_dir / LEARNING_CURVES, title)
        self.run.log_artifact(picture)
        for path in (self.best, self.last):
            if path.exists():
                self.run.log_artifact(path, CHECKPOINTS)
        if model_name is None or not self.best.exists():
            return
        if job.serving is not None:
            model_dir = build_mlflow_model(job, self.best, self.run_dir / MLFLOW_MODEL)
            profile = reference_profile(job, self.best, self.run_dir / MONITORING)
            if profile is not None:
                self.run.log_artifact(profile, MONITORING)
            self.run.log_model(model_dir, model_name, tags, step=best_epoch)
        else:
            self.run.register_model(model_name, BEST_ARTIFACT, {**tags, **digest_tag(self.best)})
        self.registering = f"{model_name} ({', '.join(f'{k} {v}' for k, v in tags.items())})"


@contextmanager
def training_session(
    config: Any,
    kind: str,
    saved: dict[str, Any] | None,
    *,
    resume: Path | None,
    device: DeviceChoice,
    tags: dict[str, Any],
    params: dict[str, Any] | None = None,
    active: bool = True,
    rendezvous: str | None = None,
    system_metrics: bool = True,
) -> Iterator[TrainingSession]:
    """Start (or continue, when `saved` is a checkpoint) the MLflow run of a `kind` training job.

    `params` are logged beside the config's fields; `active=False` (ranks other than 0) yields a
    session that logs and writes nothing; `system_metrics=False` leaves them to each node's sampler.
    """
    if not active:
        yield TrainingSession(run=tracking.NullTracker(), run_dir=Path(config.out_dir), active=False)
        return
    run_tags = {JOB_TAG: training_job(kind)}
    resume_dir = Path(resume).parent if saved and resume else None
    with tracking.open_run(
        config.experiment,
        Path(config.out_dir),
        run_name=config.run_name,
        tags=run_tags,
        resume_dir=resume_dir,
        saved_run_id=saved["run_id"] if saved else None,
        offline=config.offline,
        sync_timeout_s=config.sync_timeout,
        system_metrics=system_metrics,
    ) as run:
        run_dir = run.journal.dir.parent
        run.open_tensorboard(run_dir / TENSORBOARD)
        if saved:
            position = saved.get("position")
            within = f", step {position['step']} of epoch {position['epoch']}" if position else ""
            run.set_tags({"resumed_after_epoch": saved["epoch"], "resumed_at": f"epoch {saved['epoch']}{within}"})
            print(f"=> resuming run {run.run_id} after epoch {saved['epoch']}{within} from {resume}")
        else:
            run.log_params({**dataclasses.asdict(config), **(params or {})})
            run.set_tags({**tracking.environment_tags(device.name), "device": str(device.device),
                          "device_reason": device.reason, **tags})  # fmt: skip
        where = "offline" if config.offline else f"MLflow run {run.run_id}"
        print(f"=> {where}; checkpoints, TensorBoard logs and the tracking journal in {run_dir}", flush=True)
        session = TrainingSession(run=run, run_dir=run_dir, rendezvous=rendezvous)
        yield session
    version = run.registered_version()
    if session.registering and version:
        print(f"=> registered {session.registering}: version {version}", flush=True)
