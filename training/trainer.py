"""The one training skeleton every job runs through, top to bottom:

    device, precision and seed -> data -> model (fresh, pretrained, warm-started or resumed)
    -> DDP / torch.compile -> epochs: train, validate, checkpoint, log, hooks, early stop
    -> final metrics -> learning curves, checkpoints and the registered model in MLflow

A job (training/jobs/) declares what differs; nothing here knows images from words.
"""

from __future__ import annotations

import enum
import math
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from training.checkpoint import (
    FORMAT_VERSION,
    CheckpointError,
    load_checkpoint,
    process_seed,
    restore_rng_state,
    rng_state,
    seed_everything,
)
from training.devices import choose_device, configure_backend, grad_scaler
from training.distributed import close_process_group, init_process_group
from training.jobs.base import EpochContext, Job, Optimization, RunConfig
from training.models.summary import layer_table
from training.models.weights import copy_matching
from training.runtime import Runtime
from training.session import TrainingSession, training_session
from training.stopping import StopRequest, TrainingStopped, exit_now, stop_on_signals
from training.tracking import registry
from training.tracking.registry import best_metric_name


@dataclass(frozen=True)
class TrainResult:
    run_dir: Path  # best.pt, last.pt, the journal
    run_id: str
    best_value: float  # the job's best metric at its best epoch
    best_epoch: int
    stop_reason: str  # for people: the run's stop_reason tag
    stop_cause: StopCause  # for code


class StopCause(enum.Enum):
    """Why a run ended before a signal could stop it (a signal raises TrainingStopped instead)."""

    COMPLETED = "completed"  # every epoch ran
    EARLY_STOP = "early stop"  # --early-stop-patience
    PRUNED = "pruned"  # a sweep's pruner, through an epoch hook
    REQUESTED = "requested"  # another epoch hook's reason


class StopTraining(Exception):  # noqa: N818 - a signal, like StopIteration
    """Raised by an epoch hook to end the run after this epoch (e.g. a pruned sweep trial)."""

    def __init__(self, reason: str, cause: StopCause = StopCause.REQUESTED):
        super().__init__(reason)
        self.reason = reason
        self.cause = cause


EpochHook = Callable[[int, dict[str, float]], None]


@dataclass
class TrainState:
    """What survives between epochs and across a resume, for every job."""

    epoch: int = 0
    best_value: float = math.nan  # the job's best metric at its best epoch
    best_epoch: int = 0
    best_val_loss: float = math.inf  # early stopping watches validation loss
    epochs_since_improvement: int = 0
    train_seconds: float = 0.0
    seconds_to_best: float = 0.0

    def update(self, epoch: int, metrics: dict[str, float], seconds: float, job: Job) -> bool:
        """Record a finished epoch; return whether it is the best so far by the job's metric."""
        self.epoch = epoch
        self.train_seconds += seconds
        value = metrics[job.best.metric]
        improved = math.isnan(self.best_value) or job.best.better(value, self.best_value)
        if improved:
            self.best_value, self.best_epoch, self.seconds_to_best = value, epoch, self.train_seconds
        if metrics["val/loss"] < self.best_val_loss:
            self.best_val_loss, self.epochs_since_improvement = metrics["val/loss"], 0
        else:
            self.epochs_since_improvement += 1
        return improved


def start_runtime(config: RunConfig) -> Runtime:
    """Choose the device, join the process group, resolve --amp, seed; print what was chosen and why."""
    choice = choose_device(config.device)
    device = choice.device
    group = init_process_group(device)
    if group.enabled and device.type == "cuda":
        device = torch.device("cuda", group.local_rank)
    configure_backend(device)
    precision = choice.precision(config.amp)
    print(choice.describe(), flush=True)
    print(precision.describe(), flush=True)
    if precision.warning:
        print(f"WARNING: {precision.warning}", flush=True)
    if config.amp_requested is None:
        config.amp_requested = config.amp
    config.amp = precision.amp
    seed_everything(process_seed(config.seed, group.rank))
    return Runtime(choice, device, group, precision)


def warm_start(job: Job, model: nn.Module) -> dict[str, Any]:
    """--pretrained (the job's published weights), then --init-from (one of our checkpoints or
    registered models) on a freshly built model; return what was done (run params)."""
    done = job.pretrain(model)
    spec = job.config.init_from
    if not spec:
        return done
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = registry.local_checkpoint(spec, Path(tmp))[0]
        except registry.RegistryError as e:
            raise ValueError(f"--init-from {e}") from e
        source = load_checkpoint(path)
        if source["kind"] != job.kind:
            raise CheckpointError(f"--init-from {spec}: a {source['kind']!r} checkpoint cannot start a "
                                  f"{job.kind!r} model")  # fmt: skip
        job.check_warm_start(source)
        kept = copy_matching(model, source["model"])
    print(f"=> --init-from {spec}: weights of run {source.get('run_id')} epoch {source.get('epoch')}; "
          f"fresh: {', '.join(kept) or 'none'}")  # fmt: skip
    return {**done, "init_from_run_id": str(source.get("run_id"))}


def _checkpoint(job: Job, epoch: int, model: nn.Module, *, optimization: Optimization, scaler, state: TrainState,
                metrics: dict[str, float], model_config: dict[str, Any]) -> dict[str, Any]:  # fmt: skip
    return {
        "format_version": FORMAT_VERSION,
        "kind": job.kind,
        "epoch": epoch,
        "experiment": job.config.experiment,
        "model": model.state_dict(),
        "model_config": model_config,
        **job.inference_meta(),
        "optimizer": optimization.optimizer.state_dict(),
        "scheduler": optimization.scheduler.state_dict() if optimization.scheduler else None,
        "scaler": scaler.state_dict(),
        "rng": rng_state(),
        "train_state": asdict(state),
        "job_state": job.state_dict(),
        "metrics": metrics,
        "config": job.config.as_dict(),
    }


def _restore(saved: dict[str, Any], job: Job, model: nn.Module, optimization: Optimization, scaler) -> TrainState:
    model.load_state_dict(saved["model"])
    optimization.optimizer.load_state_dict(saved["optimizer"])
    if optimization.scheduler is not None and saved.get("scheduler"):
        optimization.scheduler.load_state_dict(saved["scheduler"])
    if saved.get("scaler"):
        scaler.load_state_dict(saved["scaler"])
    restore_rng_state(saved["rng"])
    job.load_state_dict(saved["job_state"])
    return TrainState(**saved["train_state"])


def _model_summary(session: TrainingSession, job: Job, model: nn.Module) -> None:
    example = job.example_input()
    session.run.log_text(layer_table(model, example), "model_summary.txt")
    if not job.summary_graph:
        return
    model.eval()
    try:
        with warnings.catch_warnings():  # add_graph traces with torch.jit, which warns it is deprecated
            warnings.simplefilter("ignore", FutureWarning)
            session.run.writer.add_graph(model, example)
    except Exception as e:  # tracing is a nicety; never fail a training run over it
        print(f"warning: TensorBoard graph not written: {e}")


class EpochControl:
    """The trainer's StepControl: a resumable checkpoint every `every_s` seconds within an epoch, and
    at a stop request (a signal), after which the epoch ends at this step on every process."""

    def __init__(self, stop: StopRequest, runtime: Runtime, every_s: float, save: Callable[[dict], Path | None]):
        self.stop, self.runtime, self.every_s, self.save = stop, runtime, every_s, save
        self.last_save = time.monotonic()
        self.stopped: dict[str, Any] | None = None  # where the epoch stopped: {"step", "checkpoint"}

    def after_step(self, step: int, snapshot: Callable[[], dict[str, Any]]) -> bool:
        if self.stop.agreed(self.runtime.device, distributed=self.runtime.group.enabled):
            self.stopped = {"step": step, "checkpoint": self.save(snapshot())}
            return True
        if self.every_s and time.monotonic() - self.last_save >= self.every_s:
            self.save(snapshot())
            self.last_save = time.monotonic()
        return False


def train(
    job_class: type[Job],
    config: RunConfig,
    *,
    resume: Path | None = None,
    on_epoch: EpochHook | None = None,
    register: bool = True,
) -> TrainResult:
    """Train (or resume) `job_class` with `config`; return where the run is and how it ended.

    `on_epoch(epoch, metrics)` runs after each epoch is checkpointed and logged; raising
    StopTraining there ends the run cleanly. `register=False` publishes without registering.
    SIGTERM or SIGINT ends the run KILLED after a resumable checkpoint (TrainingStopped).
    """
    saved = load_checkpoint(resume, kind=job_class.kind) if resume else None
    runtime = start_runtime(config)
    try:
        with stop_on_signals() as stop:
            return _train(job_class, config, runtime, saved=saved, resume=resume, on_epoch=on_epoch,
                          register=register, stop=stop)  # fmt: skip
    finally:
        close_process_group(runtime.group)


def _train(job_class: type[Job], config: RunConfig, runtime: Runtime, *, saved: dict[str, Any] | None,
           resume: Path | None, on_epoch: EpochHook | None, register: bool,
           stop: StopRequest) -> TrainResult:  # fmt: skip
    job = job_class(config, runtime)
    tags = {**job.build_data(), **config.tags, "amp_reason": runtime.precision.reason}
    model_config = job.model_config()
    model = job.build_model(model_config)
    warm = warm_start(job, model) if not saved else {}
    model = job.prepare_model(model.to(runtime.device))
    optimization = job.build_optimization(model, job.steps_per_epoch())
    scaler = grad_scaler(runtime.device, config.amp)
    state = TrainState()
    position = saved.get("position") if saved else None  # a run stopped within an epoch resumes there
    if saved:
        state = _restore(saved, job, model, optimization, scaler)
        if runtime.group.rank:  # the checkpoint holds rank 0's RNG; other ranks draw their own augmentations
            seed_everything(process_seed(config.seed, runtime.group.rank, state.epoch))
    # DDP averages gradients across processes; evaluation uses the plain module (no collectives).
    trained = model
    if runtime.group.enabled:
        device_ids = [runtime.device.index] if runtime.device.type == "cuda" else None
        trained = DistributedDataParallel(model, device_ids=device_ids)
    trained = torch.compile(trained) if config.compile else trained
    reduce = runtime.group.sum if runtime.group.enabled else None

    params = {**job.run_params(), **warm, **runtime.choice.features()}
    with training_session(config, job.kind, saved, resume=resume, device=runtime.choice, tags=tags, params=params,
                          active=runtime.group.is_main) as session:  # fmt: skip
        run = session.run
        if saved:
            session.catch_up(saved, "val/loss")
        elif session.active:
            _model_summary(session, job, model)
        logged = run.logged_steps(next(iter(job.step_metrics), "")) if saved and job.step_metrics else set()

        def log_step(metrics: dict[str, float], step: int) -> None:
            if step not in logged:  # a replayed epoch (after a crash) must not log its steps twice
                run.log_metrics(metrics, step=step)

        last_metrics: dict[str, float] = saved["metrics"] if saved else {}

        def save_position(epoch: int, loop: dict[str, Any]) -> Path | None:
            """A resumable last.pt within `epoch`: the last finished epoch's state plus the loop's."""
            checkpoint = _checkpoint(
                job,
                epoch - 1,
                model,
                optimization=optimization,
                scaler=scaler,
                state=state,
                metrics=last_metrics,
                model_config=model_config,
            )
            return session.save_position({**checkpoint, "position": {"epoch": epoch, **loop}})

        stop_reason, stop_cause = f"completed {config.epochs} epochs", StopCause.COMPLETED
        for epoch in range(state.epoch + 1, config.epochs + 1):
            resumed = position if position and position["epoch"] == epoch else None
            control = EpochControl(stop, runtime, config.checkpoint_every,
                                   lambda loop, epoch=epoch: save_position(epoch, loop))  # fmt: skip
            job.before_epoch(epoch, optimization)
            lr = optimization.optimizer.param_groups[0]["lr"]
            start = time.perf_counter() - (resumed["seconds"] if resumed else 0.0)
            context = EpochContext(epoch, optimization, scaler, log_step, reduce, control, resumed)
            metrics = job.train_epoch(trained, context)
            if control.stopped is not None:
                where = f"at epoch {epoch}, step {control.stopped['step']}"
                run.set_tags({"stop_reason": f"{stop.name} {where}: resumable from {control.stopped['checkpoint']}"})
                print(f"=> {stop.name}: stopped {where}; resume with: dlops train {job.kind} --resume "
                      f"{control.stopped['checkpoint']}", flush=True)  # fmt: skip
                raise TrainingStopped(stop.signum, str(control.stopped["checkpoint"]), where)
            metrics.update(job.evaluate(model, reduce))
            if optimization.scheduler is not None and not optimization.scheduler_per_batch:
                optimization.scheduler.step()
            metrics.update({"lr": lr, "time/epoch_seconds": time.perf_counter() - start})
            improved = state.update(epoch, metrics, metrics["time/epoch_seconds"], job)
            job.after_epoch(improved=improved)
            print(job.epoch_line(epoch, metrics), flush=True)
            # Checkpoint first, then metrics: a resume logs whatever a crash in between left out.
            checkpoint = _checkpoint(
                job,
                epoch,
                model,
                optimization=optimization,
                scaler=scaler,
                state=state,
                metrics=metrics,
                model_config=model_config,
            )
            session.save_epoch(checkpoint, improved=improved)
            last_metrics = metrics
            run.log_metrics(metrics, step=epoch)
            run.sync_tensorboard()
            if epoch < config.epochs and stop.agreed(runtime.device, distributed=runtime.group.enabled):
                # a signal during validation, or a job whose loop takes no StepControl: stop at the epoch's end
                run.set_tags({"stop_reason": f"{stop.name} after epoch {epoch}: resumable from {session.last}"})
                print(f"=> {stop.name}: stopped after epoch {epoch}; resume with: dlops train {job.kind} --resume "
                      f"{session.last}", flush=True)  # fmt: skip
                raise TrainingStopped(stop.signum, str(session.last), f"after epoch {epoch}")
            try:
                if on_epoch is not None:
                    on_epoch(epoch, metrics)
            except StopTraining as stopping:
                stop_reason, stop_cause = stopping.reason, stopping.cause
                print(f"=> {stop_reason}", flush=True)
                break
            if config.early_stop_patience and state.epochs_since_improvement >= config.early_stop_patience:
                stop_cause = StopCause.EARLY_STOP
                stop_reason = (f"early stop: val loss has not improved for {state.epochs_since_improvement} epochs "
                               f"(best {state.best_val_loss:.4f})")  # fmt: skip
                print(f"=> {stop_reason}", flush=True)
                break

        if session.active:
            final = job.finish(model, session.best)
            best_name = best_metric_name(job.best.metric)  # best/val_acc1, best/val_loss
            run.log_metrics({**final, "time/total_seconds": state.train_seconds, "time/to_best_seconds":
                             state.seconds_to_best, best_name: state.best_value, "best/epoch": state.best_epoch},
                            step=state.epoch)  # fmt: skip
            run.set_tags({"stop_reason": stop_reason})
            registry_tags = job.registry_tags(state.best_value, state.best_epoch, final)
            session.publish(config.registered_model if register else None, registry_tags, job.panels, job_class,
                            state.best_epoch)  # fmt: skip
            session.mark_finished()
    return TrainResult(session.run_dir, session.run.run_id, state.best_value, state.best_epoch, stop_reason,
                       stop_cause)  # fmt: skip


def main() -> None:
    """torchrun's entry point: `python -m training.trainer --job KIND --config CONFIG.json [--resume CKPT]`."""
    import argparse
    import json

    from training.jobs import job_for

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--job", required=True)
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--resume", type=Path, default=None)
    args = parser.parse_args()
    job_class = job_for(args.job)
    # the config class checks every value as the CLI does
    config = job_class.config_class(**json.loads(args.config.read_text(encoding="utf-8")))
    try:
        train(job_class, config, resume=args.resume)
    except TrainingStopped as stopped:  # state on disk, grace period running: skip the interpreter's teardown
        exit_now(stopped.exit_code)


if __name__ == "__main__":
    main()
