"""A training run's tracking: every call goes to the run's journal and returns; a sender delivers.

    with open_run(experiment, out_dir, ...) as run:     # the server is checked (<= 10 s) and the run
        run.log_params(...); run.log_metrics(..., step)  # created at start, unless offline
    # at the end: wait up to sync_timeout for delivery, then exit either way, saying what is pending

Nothing on the training path waits for the tracking server once the run has started: an outage
costs no training time, and a run that ends while the server is down is delivered later by
`dlops sync RUN_DIR` (or by resuming it).
"""

from __future__ import annotations

import contextlib
import secrets
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
from mlflow.utils.mlflow_tags import MLFLOW_USER
from torch.utils.tensorboard import SummaryWriter

from serving.secrets import redact
from training.metrics import SYSTEM_PREFIX
from training.tracking import records
from training.tracking.artifacts import NODE_METRICS, TENSORBOARD
from training.tracking.journal import Journal, JournalBusy, names_other_server
from training.tracking.sender import Delivery, Sender, http_client_settings
from training.tracking.store import (
    check_access,
    check_reachable,
    ending,
    ensure_experiment,
    find_run,
    login_name,
    refusals_explained,
    store_client,
    tracking_uri,
)

# Short runs would end before MLflow's default 10 s sampling logs anything.
SYSTEM_METRICS_INTERVAL_S = 2.0
# What a stopped run (SIGTERM, Ctrl-C) waits for delivery: well inside a preemption's grace period
# (30 s is usual); records still pending are delivered by the resume or `dlops sync`.
KILLED_SYNC_S = 5.0


def unique_run_name() -> str:
    """A run name no other run has: the start time and random hex from the OS, which no seed touches.
    (MLflow draws its generated names from `random` after the trainer seeded it: runs of the same
    seed got the same name.)"""
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"


class RunTracker:
    """An MLflow run seen through its journal, plus the TensorBoard writer that mirrors its scalars."""

    def __init__(self, journal: Journal, run_id: str, sender: Sender | None):
        self.journal, self.run_id, self.sender = journal, run_id, sender
        self.tensorboard_dir: Path | None = None
        self.writer: SummaryWriter | None = None

    def _record(self, record: records.Record) -> None:
        self.journal.append(record)
        if self.sender is not None:
            self.sender.notify()

    def open_tensorboard(self, directory: Path) -> SummaryWriter:
        """Mirror every logged scalar into TensorBoard event files under `directory`."""
        self.tensorboard_dir = directory
        self.writer = SummaryWriter(str(directory))
        return self.writer

    def log_params(self, params: Mapping[str, Any]) -> None:
        self._record(records.Params(params={k: "None" if v is None else str(v) for k, v in params.items()}))

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self._record(records.Tags(tags={k: str(v) for k, v in tags.items()}))

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        self._record(records.Metrics(metrics={k: float(v) for k, v in metrics.items()}, step=step))
        if self.writer:
            for name, value in metrics.items():
                self.writer.add_scalar(name, value, step)

    def logged_steps(self, metric: str) -> set[int]:
        return self.journal.metric_steps(metric)

    def metric_history(self, metric: str) -> list[tuple[int, float]]:
        return self.journal.metric_history(metric)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self._record(records.Artifact(path=str(Path(path).resolve()), artifact_path=artifact_path))

    def log_text(self, text: str, artifact_file: str) -> None:
        spooled = self.journal.spool_text(text, artifact_file)
        self._record(records.Text(spool=spooled.name, artifact_file=artifact_file))

    def sync_tensorboard(self) -> None:
        """Flush the event files and send them with the run, so a crash loses at most one epoch."""
        if self.writer and self.tensorboard_dir:
            self.writer.flush()
            self._record(records.ArtifactDir(path=str(self.tensorboard_dir.resolve()), artifact_path=TENSORBOARD))

    def register_model(self, name: str, artifact_path: str, tags: Mapping[str, str]) -> None:
        """Register a logged artifact as a version of `name` once it is delivered."""
        self._record(records.Register(name=name, artifact_path=artifact_path, tags=dict(tags)))

    def log_model(self, model_dir: Path, name: str, tags: Mapping[str, str], step: int) -> None:
        """Log a saved MLflow model as a LoggedModel of this run (with its metrics at `step`) and
        register it as a version of `name`, once delivered."""
        self._record(records.LogModel(path=str(Path(model_dir).resolve()), name=name, tags=dict(tags), step=step))

    def registered_version(self) -> str | None:
        registered = self.journal.state().get("registered")
        return registered["version"] if registered else None

    def end(self, status: str) -> None:
        if self.writer:
            self.sync_tensorboard()
            self.writer.close()
            self.writer = None
        self._record(records.End(status=status))


class NullTracker(RunTracker):
    """Stands in for the run on processes that do not log (ranks other than 0)."""

    def __init__(self) -> None:
        self.run_id, self.sender, self.writer, self.tensorboard_dir = "", None, None, None

    def _record(self, record: records.Record) -> None:
        pass

    def open_tensorboard(self, directory: Path) -> None:
        return None

    def log_text(self, text: str, artifact_file: str) -> None:
        pass

    def logged_steps(self, metric: str) -> set[int]:
        return set()

    def metric_history(self, metric: str) -> list[tuple[int, float]]:
        return []

    def registered_version(self) -> None:
        return None

    def end(self, status: str) -> None:
        pass


class JournalSystemMetrics:
    """MLflow's system-metric samplers (CPU, memory, disk, network, GPU), their figures logged through
    the journal as system/* metrics. Only the samplers' public methods are used (collect_metrics,
    aggregate_metrics, monitors, clear_metrics); the thread and the step count are ours, so an MLflow
    release that reworks its own logging loop cannot break this one silently."""

    def __init__(self, run: RunTracker, node: str | None = None):
        self.run = run
        self.sampler = SystemMetricsMonitor(run.run_id, sampling_interval=SYSTEM_METRICS_INTERVAL_S, node_id=node)
        steps = [r.step for r in run.journal.records if isinstance(r, records.Metrics) and r.system]
        self.step = max(steps) + 1 if steps else 0  # a resumed run goes on where it stopped
        self.stopping = threading.Event()
        self.thread: threading.Thread | None = None

    def start(self) -> None:
        self.thread = threading.Thread(target=self._sample, name="dlops-system-metrics", daemon=True)
        self.thread.start()

    def _sample(self) -> None:
        while not self.stopping.is_set():
            for _ in range(self.sampler.samples_before_logging):
                self.sampler.collect_metrics()
                if self.stopping.wait(self.sampler.sampling_interval):
                    break
            metrics = self.sampler.aggregate_metrics()
            if metrics:
                self._publish(metrics)

    def _publish(self, metrics: dict[str, float]) -> None:
        node = self.sampler.node_id
        prefix = SYSTEM_PREFIX + (f"{node}/" if node else "")
        system = records.Metrics(metrics={prefix + k: float(v) for k, v in metrics.items()}, step=self.step,
                                 system=True)  # fmt: skip
        self.run._record(system)
        self.step += 1
        for monitor in self.sampler.monitors:
            monitor.clear_metrics()

    def finish(self) -> None:
        self.stopping.set()
        if self.thread is not None:
            self.thread.join()
            self.thread = None


def _start_journal(
    experiment: str, out_dir: Path, run_name: str | None, *, tags: Mapping[str, str], resume_dir: Path | None,
    saved_run_id: str | None, offline: bool, uri: str,
) -> tuple[Journal, str]:  # fmt: skip
    """Create or reopen the run's journal; online, create or check the run on the server now."""
    if resume_dir is not None:
        journal = Journal(resume_dir)
        state = journal.state() or journal.update_state(run_id=saved_run_id, experiment=experiment, tracking_uri=uri)
        run_id = state.get("run_id") or state.get("local_id")
        if not offline and state.get("run_id") and find_run(state["run_id"]) is None:
            raise RuntimeError(f"run {state['run_id']} named in the checkpoint is not in the tracking store "
                               f"{redact(uri)}")  # fmt: skip
        journal.append(records.Status(status="RUNNING"))
        return journal, run_id
    if offline:
        local_id = uuid.uuid4().hex
        journal = Journal(out_dir / local_id)
        journal.update_state(run_id=None, local_id=local_id, experiment=experiment)
        journal.append(records.CreateRun(experiment=experiment, run_name=run_name, tags=dict(tags), local_id=local_id))
        return journal, local_id
    client = store_client()
    with refusals_explained(uri):  # a login without the right to create runs here stops the run now
        run = client.create_run(ensure_experiment(experiment, client), run_name=run_name, tags=dict(tags))
    journal = Journal(out_dir / run.info.run_id)
    journal.update_state(run_id=run.info.run_id, experiment=experiment, tracking_uri=uri)
    return journal, run.info.run_id


@contextmanager
def open_run(
    experiment: str,
    out_dir: Path,
    *,
    run_name: str | None = None,
    tags: Mapping[str, str] | None = None,
    resume_dir: Path | None = None,
    saved_run_id: str | None = None,
    offline: bool = False,
    sync_timeout_s: float = 60.0,
    system_metrics: bool = True,
) -> Iterator[RunTracker]:
    """Start (or continue) a training run tracked through its journal; end it FINISHED, FAILED or KILLED.
    `system_metrics=False`: this machine's are sampled elsewhere (node_system_metrics)."""
    uri = tracking_uri()
    if not offline:
        check_reachable(uri)
        http_client_settings(uri)
        check_access(uri)
    journal, run_id = _start_journal(
        experiment,
        Path(out_dir),
        run_name or unique_run_name(),
        tags={MLFLOW_USER: login_name(), **(tags or {})},
        resume_dir=resume_dir,
        saved_run_id=saved_run_id,
        offline=offline,
        uri=uri,
    )
    with contextlib.ExitStack() as stack:
        sender = None
        if not offline:
            stack.enter_context(journal.delivery_lock())
            sender = Sender(Delivery(journal, uri))
            sender.start()
        run = RunTracker(journal, run_id, sender)
        monitor = JournalSystemMetrics(run) if system_metrics else None
        if monitor:
            monitor.start()

        def end(status: str) -> None:
            if monitor:
                monitor.finish()
            run.end(status)
            # a run stopped by a signal has a grace period to live: the journal keeps what is late
            _finish_delivery(journal, sender, uri, min(sync_timeout_s, KILLED_SYNC_S) if status == "KILLED"
                             else sync_timeout_s)  # fmt: skip

        with ending(end):
            yield run


@contextmanager
def node_system_metrics(run_id: str, run_dir: Path, node: str) -> Iterator[None]:
    """This machine's system metrics in run `run_id` as system/NODE/..., through a journal of its own
    (RUN_DIR/node-metrics/NODE/journal): in a multi-node run each node samples itself into the one run, rank 0
    logs everything else. A restarted node goes on from its journal's last step."""
    uri = tracking_uri()
    journal = Journal(Path(run_dir) / NODE_METRICS / node)
    journal.update_state(run_id=run_id, tracking_uri=uri)
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(journal.delivery_lock())
        except JournalBusy as e:  # two nodes of one name: the second says so and goes on without sampling
            print(f"=> node {node}'s system metrics are already sampled ({e}): give each node its own "
                  "MLFLOW_SYSTEM_METRICS_NODE_ID", flush=True)  # fmt: skip
            journal.close()
            yield
            return
        sender = Sender(Delivery(journal, uri))
        sender.start()
        monitor = JournalSystemMetrics(RunTracker(journal, run_id, sender), node=node)
        monitor.start()
        try:
            yield
        finally:
            monitor.finish()
            _finish_delivery(journal, sender, uri, KILLED_SYNC_S)


def end_abandoned(run_dir: Path, tags: Mapping[str, str], timeout_s: float = KILLED_SYNC_S) -> bool:
    """Set `tags` on a run none of whose processes lives any more (a multi-node run that torchrun gave up on),
    ending it KILLED if none of them could (rank 0's node was lost), and deliver now what the server will
    take. False when another process is doing it."""
    journal = Journal(run_dir)
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(journal.delivery_lock())
        except JournalBusy:
            journal.close()
            return False
        last = next((r for r in reversed(journal.records) if isinstance(r, records.End | records.Status)), None)
        journal.append(records.Tags(tags=dict(tags)))
        if not isinstance(last, records.End):
            journal.append(records.End(status="KILLED"))
        uri, state = tracking_uri(), journal.state()
        # an offline run, or one that names another server, is left for `dlops sync` (which says why)
        sender = Sender(Delivery(journal, uri)) if state.get("run_id") and not names_other_server(state, uri) else None
        if sender:
            sender.start()
        _finish_delivery(journal, sender, uri, timeout_s)
    return True


def _finish_delivery(journal: Journal, sender: Sender | None, uri: str, timeout_s: float) -> None:
    """Wait (at most `timeout_s`) for the run's records to reach the server; say what is left and how to send it."""
    run_dir = journal.dir.parent
    if sender is None:
        print(f"=> offline: {journal.pending} tracking records kept in {journal.dir}; deliver them with: "
              f"dlops sync {run_dir}", flush=True)  # fmt: skip
    else:
        delivered = sender.drain(timeout_s)
        sender.stop()
        if sender.refused is not None:
            print(f"=> {sender.refused}. {journal.pending} records are kept in {journal.dir}; once that is fixed, "
                  f"deliver them with: dlops sync {run_dir}", flush=True)  # fmt: skip
        elif not delivered:
            print(f"=> the tracking server at {redact(uri)} did not take the run within {timeout_s:g} s "
                  f"({sender.last_error}); {journal.pending} records are kept in {journal.dir}. Deliver them "
                  f"with: dlops sync {run_dir}", flush=True)  # fmt: skip
    journal.close()
