"""The one training skeleton every job runs through, top to bottom:

    device, precision and seed -> data -> model (fresh, pretrained, warm-started or resumed)
    -> DDP / torch.compile -> epochs: train, validate, checkpoint, log, hooks, early stop
    -> final metrics -> learning curves, checkpoints and the registered model in MLflow

A job (training/jobs/) declares what differs; nothing here knows images from words.
"""

from __future__ import annotations

import contextlib
import dataclasses
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
    copy_matching,
    load_checkpoint,
    process_seed,
    restore_rng_state,
    rng_state,
    seed_everything,
)
from training.devices import choose_device, configure_backend, grad_scaler
from training.distributed import (
    ProcessGroup,
    close_process_group,
    init_process_group,
    launched_nodes,
    node_id,
    peer_lost,
    rendezvous_id,
    topology,
)
from training.jobs.config import RunConfig
from training.jobs.run import EpochContext, JobRun
from training.jobs.spec import JobSpec
from training.metrics import BEST_EPOCH, EPOCH_SECONDS, LR, TO_BEST_SECONDS, TOTAL_SECONDS, best_metric_name
from training.models.summary import layer_table
from training.runtime import Runtime
from training.session import TrainingSession, find_resumable, training_session
from training.stopping import NodeLost, StopRequest, TrainingStopped, exit_now, stop_on_signals
from training.tracking import node_system_metrics, registry
from training.tracking.artifacts import MODEL_SUMMARY
from training.tracking.tags import NODE_LOST, RESTARTS, STOP_REASON


@dataclass(frozen=True, kw_only=True)
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


@dataclass(kw_only=True)
class TrainState:
    """What survives between epochs and across a resume, for every job."""

    epoch: int = 0
    best_value: float = math.nan  # the job's best metric at its best epoch
    best_epoch: int = 0
    best_val_loss: float = math.inf  # early stopping watches the job's early-stop metric (val loss)
    epochs_since_improvement: int = 0
    train_seconds: float = 0.0
    seconds_to_best: float = 0.0
    restarts: int = 0  # resumes by a restarted process group (a lost process or node)

    def update(self, epoch: int, metrics: dict[str, float], seconds: float, spec: JobSpec) -> bool:
        """Record a finished epoch; return whether it is the best so far by the job's metric."""
        self.epoch = epoch
        self.train_seconds += seconds
        value = metrics[spec.best.name]
        improved = math.isnan(self.best_value) or spec.best.better(value, self.best_value)
        if improved:
            self.best_value, self.best_epoch, self.seconds_to_best = value, epoch, self.train_seconds
        watched = metrics[spec.early_stop.name]
        if math.isinf(self.best_val_loss) or spec.early_stop.better(watched, self.best_val_loss):
            self.best_val_loss, self.epochs_since_improvement = watched, 0
        else:
            self.epochs_since_improvement += 1
        return improved


def start_runtime(config: RunConfig) -> tuple[Runtime, RunConfig]:
    """Choose the device, join the process group, resolve --amp, seed; print what was chosen and why.
    Returns the runtime and the config with --amp resolved for the device (what was asked kept)."""
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
    config = dataclasses.replace(config, amp=precision.amp, amp_requested=config.amp_requested or config.amp)
    seed_everything(process_seed(config.seed, group.rank))
    return Runtime(choice=choice, device=device, group=group, precision=precision), config


def warm_start(job: JobRun, model: nn.Module) -> dict[str, Any]:
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
        if source["kind"] != job.spec.kind:
            raise CheckpointError(f"--init-from {spec}: a {source['kind']!r} checkpoint cannot start a "
                                  f"{job.spec.kind!r} model")  # fmt: skip
        job.check_warm_start(source)
        kept = copy_matching(model, source["model"])
    print(f"=> --init-from {spec}: weights of run {source.get('run_id')} epoch {source.get('epoch')}; "
          f"fresh: {', '.join(kept) or 'none'}")  # fmt: skip
    return {**done, "init_from_run_id": str(source.get("run_id"))}


def _model_summary(session: TrainingSession, job: JobRun, model: nn.Module) -> None:
    example = job.example_input()
    session.run.log_text(layer_table(model, example), MODEL_SUMMARY)
    if not job.spec.summary_graph:
        return
    model.eval()
    try:
        with warnings.catch_warnings():  # add_graph traces with torch.jit, which warns it is deprecated,
            warnings.simplefilter("ignore", FutureWarning)  # and about shapes read as Python numbers
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
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
    spec: JobSpec,
    config: RunConfig,
    *,
    resume: Path | None = None,
    on_epoch: EpochHook | None = None,
    register: bool = True,
) -> TrainResult:
    """Train (or resume) a run of job `spec` with `config`; return where the run is and how it ended.

    `on_epoch(epoch, metrics)` runs after each epoch is checkpointed and logged; raising
    StopTraining there ends the run cleanly. `register=False` publishes without registering.
    SIGTERM or SIGINT ends the run KILLED after a resumable checkpoint (TrainingStopped).
    """
    saved = load_checkpoint(resume, kind=spec.kind) if resume else None
    runtime, config = start_runtime(config)
    try:
        restarted = saved is None and (resume := restarted_from(spec.kind, config, runtime.group)) is not None
        if restarted:
            saved = load_checkpoint(resume, kind=spec.kind)
        with stop_on_signals() as stop:
            trainer = Trainer(spec.run(spec=spec, config=config, runtime=runtime), saved=saved, resume=resume,
                              stop=stop, restarted=restarted)  # fmt: skip
            return trainer.run(on_epoch=on_epoch, register=register)
    finally:
        close_process_group(runtime.group)


def restarted_from(kind: str, config: RunConfig, group: ProcessGroup) -> Path | None:
    """Where a restarted process group resumes: the last.pt of the unfinished run of this rendezvous id (torchrun
    restarts every process with the same command after one, or a node, is lost), as rank 0 finds it; None for
    a first start. Every node must see it: --out-dir is a folder they share."""
    run_id = rendezvous_id()
    if run_id is None:
        return None
    found = group.broadcast(find_resumable(Path(config.out_dir), kind, rendezvous=run_id) if group.is_main else None)
    if found is not None and not Path(found).is_file():
        raise CheckpointError(f"rank {group.rank} on node {node_id()}: rank 0 resumes from {found}, which this node "
                              "does not see: give every node the same shared --out-dir (a shared volume)")  # fmt: skip
    if found is not None:
        print(f"=> rendezvous {run_id}: the process group was restarted; resuming its run from {found}", flush=True)
    return None if found is None else Path(found)


class Trainer:
    """One run of a job, from a fresh or resumed start to its published result.

    Its state, all of it here: the job (and through it the resolved config, data and runtime), the
    model as built and as trained (wrapped in DDP and compiled when asked), the optimizer and
    schedule, the loss scaler, TrainState (epochs, best, early stopping), the stop request of a
    signal, and, while the run is open, its session (checkpoints and tracking) and the last
    epoch's metrics (what a mid-epoch checkpoint records).
    """

    def __init__(self, job: JobRun, *, saved: dict[str, Any] | None, resume: Path | None, stop: StopRequest,
                 restarted: bool = False):  # fmt: skip
        self.job, self.spec, self.runtime = job, job.spec, job.runtime
        self.saved, self.resume, self.stop, self.restarted = saved, resume, stop, restarted
        # several machines: each samples its own system metrics into the run (system/NODE/...)
        self.nodes = launched_nodes()
        self.tags = {**job.build_data(), **job.config.tags, "amp_reason": self.runtime.precision.reason}
        self.model_config = job.model_config()
        self.model = self.spec.build_model(**self.model_config)
        self.warm = warm_start(job, self.model) if not saved else {}
        self.model = job.prepare_model(self.model.to(self.runtime.device))
        self.optimization = job.build_optimization(self.model, job.steps_per_epoch())
        self.scaler = grad_scaler(self.runtime.device, job.config.amp)
        self.state = self._restore(saved) if saved else TrainState()
        self.trained = self._wrap(self.model)
        self.session: TrainingSession | None = None
        self.last_metrics: dict[str, float] = saved["metrics"] if saved else {}
        self.logged_steps: set[int] = set()

    @property
    def config(self) -> RunConfig:
        return self.job.config

    def _restore(self, saved: dict[str, Any]) -> TrainState:
        self.model.load_state_dict(saved["model"])
        self.optimization.optimizer.load_state_dict(saved["optimizer"])
        if self.optimization.scheduler is not None and saved.get("scheduler"):
            self.optimization.scheduler.load_state_dict(saved["scheduler"])
        if saved.get("scaler"):
            self.scaler.load_state_dict(saved["scaler"])
        restore_rng_state(saved["rng"])
        self.job.load_state_dict(saved["job_state"])
        state = TrainState(**saved["train_state"])
        if self.runtime.group.rank:  # the checkpoint holds rank 0's RNG; other ranks draw their own augmentations
            seed_everything(process_seed(self.config.seed, self.runtime.group.rank, state.epoch))
        return state

    def _wrap(self, model: nn.Module) -> nn.Module:
        """What trains: DDP averages gradients across processes (evaluation uses the plain module, no
        collectives), then torch.compile when asked."""
        if self.runtime.group.enabled:
            device_ids = [self.runtime.device.index] if self.runtime.device.type == "cuda" else None
            model = DistributedDataParallel(model, device_ids=device_ids)
        return torch.compile(model) if self.config.compile else model

    # --- the run -------------------------------------------------------------------------------------
    def run(self, *, on_epoch: EpochHook | None, register: bool) -> TrainResult:
        job, runtime = self.job, self.runtime
        params = {**job.run_params(), **self.warm, **runtime.choice.features()}
        if self.nodes:
            params.update({**topology(), **self.nodes.params()})
        with training_session(self.config, self.spec.kind, self.saved, resume=self.resume, device=runtime.choice,
                              tags=self.tags, params=params, active=runtime.group.is_main, rendezvous=rendezvous_id(),
                              system_metrics=not self.nodes) as session, self._node_metrics(session):  # fmt: skip
            self.session = session
            self._begin()
            try:
                stop_reason, stop_cause = self._epochs(on_epoch)
            except RuntimeError as error:
                if not peer_lost(error):
                    raise
                self._peer_lost(error)
            if session.active:
                self._publish(stop_reason, register=register)
        state = self.state
        return TrainResult(run_dir=session.run_dir, run_id=session.run.run_id, best_value=state.best_value,
                           best_epoch=state.best_epoch, stop_reason=stop_reason, stop_cause=stop_cause)  # fmt: skip

    def _node_metrics(self, session: TrainingSession) -> contextlib.AbstractContextManager:
        """Several machines: the first process of each node samples the node into the run (its own journal)."""
        group = self.runtime.group
        if not self.nodes:
            return contextlib.nullcontext()
        if self.config.offline:  # the same on every process: no run on the server to log into yet
            if group.node_leader:
                print(f"=> offline: node {node_id()}'s system metrics are not recorded", flush=True)
            return contextlib.nullcontext()
        run_id, run_dir = group.broadcast((session.run.run_id, str(session.run_dir)) if group.is_main else None)
        return node_system_metrics(run_id, Path(run_dir), node_id()) if group.node_leader else contextlib.nullcontext()

    def _begin(self) -> None:
        session, spec = self.session, self.spec
        if self.restarted:
            self.state.restarts += 1
            shape = topology()
            session.run.set_tags({RESTARTS: self.state.restarts})
            print(f"=> restart {self.state.restarts} of this run, on {shape['nodes']} node(s) x "
                  f"{shape['processes_per_node']} process(es)", flush=True)  # fmt: skip
        if self.saved:
            session.catch_up(self.saved, spec.early_stop.name)
        elif session.active:
            _model_summary(session, self.job, self.model)
        if self.saved and spec.step_metrics:  # a replayed epoch (after a crash) must not log its steps twice
            self.logged_steps = session.run.logged_steps(spec.step_metrics[0])

    def _log_step(self, metrics: dict[str, float], step: int) -> None:
        if step not in self.logged_steps:
            self.session.run.log_metrics(metrics, step=step)

    def _epochs(self, on_epoch: EpochHook | None) -> tuple[str, StopCause]:
        """Every epoch still to train; why they ended (a signal raises TrainingStopped instead)."""
        for epoch in range(self.state.epoch + 1, self.config.epochs + 1):
            metrics = self._epoch(epoch)
            # a signal during validation, or a job whose loop takes no StepControl: stop at the epoch's end
            if epoch < self.config.epochs and self.stop.agreed(self.runtime.device,
                                                               distributed=self.runtime.group.enabled):  # fmt: skip
                self._stopped(f"after epoch {epoch}", self.session.last)
            try:
                if on_epoch is not None:
                    on_epoch(epoch, metrics)
            except StopTraining as stopping:
                print(f"=> {stopping.reason}", flush=True)
                return stopping.reason, stopping.cause
            patience, waited = self.config.early_stop_patience, self.state.epochs_since_improvement
            if patience and waited >= patience:
                reason = (f"early stop: {self.spec.early_stop.label} has not improved for {waited} epochs "
                          f"(best {self.state.best_val_loss:.4f})")  # fmt: skip
                print(f"=> {reason}", flush=True)
                return reason, StopCause.EARLY_STOP
        return f"completed {self.config.epochs} epochs", StopCause.COMPLETED

    def _epoch(self, epoch: int) -> dict[str, float]:
        """Train, validate, checkpoint and log one epoch; return its metrics."""
        job, optimization = self.job, self.optimization
        position = self.saved.get("position") if self.saved else None  # a run stopped within an epoch resumes there
        resumed = position if position and position["epoch"] == epoch else None
        control = EpochControl(self.stop, self.runtime, self.config.checkpoint_every,
                               lambda loop: self._save_position(epoch, loop))  # fmt: skip
        job.before_epoch(epoch, optimization)
        lr = optimization.optimizer.param_groups[0]["lr"]
        start = time.perf_counter() - (resumed["seconds"] if resumed else 0.0)
        context = EpochContext(epoch=epoch, optimization=optimization, scaler=self.scaler, log_step=self._log_step,
                               reduce=self._reduce, control=control, resume=resumed)  # fmt: skip
        metrics = job.train_epoch(self.trained, context)
        if control.stopped is not None:
            self._stopped(f"at epoch {epoch}, step {control.stopped['step']}", control.stopped["checkpoint"])
        metrics.update(job.evaluate(self.model, self._reduce))
        if optimization.scheduler is not None and not optimization.scheduler_per_batch:
            optimization.scheduler.step()
        metrics.update({LR: lr, EPOCH_SECONDS: time.perf_counter() - start})
        improved = self.state.update(epoch, metrics, metrics[EPOCH_SECONDS], self.spec)
        job.after_epoch(improved=improved)
        print(job.epoch_line(epoch, metrics), flush=True)
        # Checkpoint first, then metrics: a resume logs whatever a crash in between left out.
        self.session.save_epoch(self._checkpoint(epoch, metrics), improved=improved)
        self.last_metrics = metrics
        self.session.run.log_metrics(metrics, step=epoch)
        self.session.run.sync_tensorboard()
        return metrics

    @property
    def _reduce(self) -> Callable[[torch.Tensor], torch.Tensor] | None:
        return self.runtime.group.sum if self.runtime.group.enabled else None

    def _stopped(self, where: str, checkpoint: Path | str | None) -> None:
        """A signal asked to stop and every process agreed: end the run KILLED where it stands, resumable
        from `checkpoint` (TrainingStopped)."""
        self.session.run.set_tags({STOP_REASON: f"{self.stop.name} {where}: resumable from {checkpoint}"})
        print(f"=> {self.stop.name}: stopped {where}; resume with: dlops train {self.spec.kind} --resume "
              f"{checkpoint}", flush=True)  # fmt: skip
        raise TrainingStopped(self.stop.signum, str(checkpoint), where)

    def _peer_lost(self, error: RuntimeError) -> None:
        """A collective failed because another process or node died: end the run KILLED, resumable from the
        last checkpoint, and exit so that torchrun restarts the group (or gives up, and the run stays KILLED)."""
        where = f"in epoch {self.state.epoch + 1}"
        said = str(error).strip().splitlines()[0][:300]
        resume = "torchrun restarts the group (--max-restarts); else run the same command again on every node"
        self.session.run.set_tags({NODE_LOST: f"{where}: {said}", STOP_REASON: f"a peer process or node was lost "
                                   f"{where}: resumable from {self.session.last}; {resume}"})  # fmt: skip
        print(f"=> a peer process or node was lost {where} ({said}); resumable from {self.session.last}: {resume} "
              "(the same --rdzv-id resumes this run)", flush=True)  # fmt: skip
        raise NodeLost(str(self.session.last), where) from error

    # --- checkpoints ---------------------------------------------------------------------------------
    def _checkpoint(self, epoch: int, metrics: dict[str, float]) -> dict[str, Any]:
        job, optimization = self.job, self.optimization
        return {
            "format_version": FORMAT_VERSION,
            "kind": self.spec.kind,
            "epoch": epoch,
            "experiment": self.config.experiment,
            "model": self.model.state_dict(),
            "model_config": self.model_config,
            **job.inference_meta(),
            "optimizer": optimization.optimizer.state_dict(),
            "scheduler": optimization.scheduler.state_dict() if optimization.scheduler else None,
            "scaler": self.scaler.state_dict(),
            "rng": rng_state(),
            "train_state": asdict(self.state),
            "job_state": job.state_dict(),
            "metrics": metrics,
            "config": self.config.as_dict(),
        }

    def _save_position(self, epoch: int, loop: dict[str, Any]) -> Path | None:
        """A resumable last.pt within `epoch`: the last finished epoch's state plus the loop's."""
        checkpoint = self._checkpoint(epoch - 1, self.last_metrics)
        return self.session.save_position({**checkpoint, "position": {"epoch": epoch, **loop}})

    def _publish(self, stop_reason: str, *, register: bool) -> None:
        """Final metrics, the stop reason, learning curves, checkpoints and the registered version."""
        job, state, run = self.job, self.state, self.session.run
        final = job.finish(self.model, self.session.best)
        run.log_metrics({**final, TOTAL_SECONDS: state.train_seconds, TO_BEST_SECONDS: state.seconds_to_best,
                         best_metric_name(self.spec.best.name): state.best_value, BEST_EPOCH: state.best_epoch},
                        step=state.epoch)  # fmt: skip
        run.set_tags({STOP_REASON: stop_reason})
        registry_tags = job.registry_tags(state.best_value, state.best_epoch, final)
        self.session.publish(self.config.registered_model if register else None, registry_tags, self.spec,
                             state.best_epoch)  # fmt: skip
        self.session.mark_finished()


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
    spec = job_for(args.job)
    # the config class checks every value as the CLI does
    config = spec.config(**json.loads(args.config.read_text(encoding="utf-8")))
    try:
        train(spec, config, resume=args.resume)
    except TrainingStopped as stopped:  # state on disk, grace period running: skip the interpreter's teardown
        exit_now(stopped.exit_code)


if __name__ == "__main__":
    main()
