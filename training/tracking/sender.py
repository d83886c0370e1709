"""Deliver a journal's records to the tracking store, in order, exactly once.

`Delivery` sends what is pending; `Sender` runs it in a background thread, retrying an outage
(no connection, a timeout, 5xx, 429) with backoff for as long as the process lives, so training
never waits for the server. A refusal (401, 403, another 4xx: a wrong login, no permission) is
not an outage: the sender says so once and stops; the records stay in the journal for `dlops sync`
once the login or the permission is fixed. Delivery is
idempotent where a record may already be on the server (the first one after a restart, or one
retried after an error whose effect is unknown): metric steps the run's history already holds
are not sent again, an artifact already there with the same size is not uploaded again, a model
version of the same run and source is reused, a run created earlier is found by its local id.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from serving import environment
from serving.secrets import redact
from training.tracking.journal import Journal
from training.tracking.records import (
    Artifact,
    ArtifactDir,
    CreateRun,
    End,
    LogModel,
    Metrics,
    Params,
    Record,
    Register,
    Status,
    Tags,
    Text,
)
from training.tracking.registry import log_mlflow_model
from training.tracking.store import (
    TrackingRefused,
    ensure_experiment,
    explain_refusal,
    initialize_store,
    refusal_status,
    register_model,
)
from training.tracking.tags import LOCAL_RUN_ID, REGISTERED_MODEL

BACKOFF_MAX_S = 30.0


class Delivery:
    def __init__(self, journal: Journal, uri: str):
        self.journal, self.uri = journal, uri
        initialize_store(uri)
        self.client = MlflowClient(uri)
        self.uncertain = True  # the record at the cursor may already be on the server

    @property
    def run_id(self) -> str | None:
        return self.journal.state().get("run_id")

    def deliver_pending(self, progress: Callable[[int, int], None] | None = None) -> int:
        """Send every pending record in order; return how many. Raises on the first failure."""
        records = self.journal.records
        first, last = self.journal.delivered, len(records)
        for index in range(first, last):
            if not self._superseded(records, index, last):
                self._deliver(records[index])
            self.journal.mark_delivered(index + 1)
            self.uncertain = False
            if progress:
                progress(index + 1 - first, last - first)
        return last - first

    @staticmethod
    def _superseded(records: list[Record], index: int, last: int) -> bool:
        """A file upload that a later record of the same files makes moot."""
        record = records[index]
        if not isinstance(record, Artifact | ArtifactDir):
            return False
        return any(type(r) is type(record) and (r.path, r.artifact_path) == (record.path, record.artifact_path)
                   for r in records[index + 1 : last])  # fmt: skip

    def _deliver(self, record: Record) -> None:
        if isinstance(record, CreateRun):
            self._create_run(record)
            return
        run_id = self.run_id
        if run_id is None:
            raise RuntimeError("the journal has records for a run that was never created")
        client = self.client
        match record:
            case Status(status=status):
                client.update_run(run_id, status=status)
            case Params(params=params):
                client.log_batch(run_id, params=[Param(k, v) for k, v in params.items()])
            case Tags(tags=tags):
                client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
            case Metrics():
                self._metrics(run_id, record)
            case Artifact():
                if path := self._inside_run(record.path, record.op):
                    self._artifact(run_id, path, record.artifact_path)
            case ArtifactDir():
                if (path := self._inside_run(record.path, record.op)) and path.is_dir():
                    client.log_artifacts(run_id, str(path), record.artifact_path)
            case Text():
                if spooled := self._inside_run(self.journal.spool_dir / record.spool, record.op):
                    client.log_text(run_id, spooled.read_text(encoding="utf-8"), record.artifact_file)
            case Register() | LogModel():
                self._register(run_id, record)
            case End(status=status):
                client.set_terminated(run_id, status, end_time=record.time)

    def _register(self, run_id: str, record: Register | LogModel) -> None:
        """A registered version of the run: its checkpoint file, or its MLflow model."""
        client = self.client
        if isinstance(record, Register):
            version = register_model(run_id, record.artifact_path, record.name, record.tags, client)
        else:
            if not self._inside_run(record.path, record.op):
                return
            version = log_mlflow_model(client, run_id, Path(record.path), registered_name=record.name,
                                       tags=record.tags, step=record.step,
                                       source_key=f"{run_id}-{record.time}")  # fmt: skip
        client.set_tag(run_id, REGISTERED_MODEL, f"{record.name}/{version}")
        self.journal.update_state(registered={"name": record.name, "version": version})

    def _create_run(self, record: CreateRun) -> None:
        """The server-side run of an offline run (found again by its local id if created before)."""
        if self.run_id is not None:
            return
        experiment_id = ensure_experiment(record.experiment, self.client)
        local = record.local_id
        existing = self.client.search_runs([experiment_id], f"tags.{LOCAL_RUN_ID} = '{local}'")
        if existing:
            run_id = existing[0].info.run_id
        else:
            tags = {**record.tags, LOCAL_RUN_ID: local}
            run = self.client.create_run(experiment_id, start_time=record.time, tags=tags, run_name=record.run_name)
            run_id = run.info.run_id
        self.journal.update_state(run_id=run_id, tracking_uri=self.uri)

    def _inside_run(self, path: str | Path, op: str) -> Path | None:
        """`path` when it lies inside the run's folder, else None (said): a journal is data, and one planted
        in a shared runs/ folder must not upload files from elsewhere (`spool/../../x`, /home/...)."""
        run_dir = self.journal.dir.parent.resolve()
        resolved = Path(path).resolve()
        if resolved == run_dir or run_dir in resolved.parents:
            return resolved
        print(f"warning: a {op} record of {run_dir} names {path}, outside the run folder: not uploaded", flush=True)
        return None

    def _metrics(self, run_id: str, record: Metrics) -> None:
        step, values = record.step, dict(record.metrics)
        if self.uncertain:  # the run's history is the truth: never log a step twice
            for key in list(values):
                if any(m.step == step for m in self.client.get_metric_history(run_id, key)):
                    del values[key]
        if values:
            metrics = [Metric(k, float(v), record.time, step) for k, v in values.items()]
            self.client.log_batch(run_id, metrics=metrics)

    def _artifact(self, run_id: str, path: Path, artifact_path: str | None) -> None:
        if not path.is_file():
            print(f"warning: {path} is gone; it was not uploaded to run {run_id}", flush=True)
            return
        if self.uncertain:
            there = {Path(f.path).name: f.file_size for f in self.client.list_artifacts(run_id, artifact_path)}
            if there.get(path.name) == path.stat().st_size:
                return
        self.client.log_artifact(run_id, str(path), artifact_path)


class Sender(threading.Thread):
    """Delivers in the background; `notify()` after each append, `drain()` at the end of the run."""

    def __init__(self, delivery: Delivery):
        super().__init__(name="dlops-tracking-sender", daemon=True)
        self.delivery = delivery
        self.last_error: Exception | None = None
        self.refused: TrackingRefused | None = None  # a permanent refusal: delivery stopped
        self._wake, self._stopping = threading.Event(), threading.Event()
        self._idle = threading.Event()

    def notify(self) -> None:
        self._wake.set()

    def run(self) -> None:
        backoff = 1.0
        while not self._stopping.is_set():
            self._idle.clear()
            try:
                self.delivery.deliver_pending()
                self.last_error, backoff = None, 1.0
            except Exception as e:  # keep the records; an outage is tried again later, a refusal is not
                self.delivery.uncertain = True
                self.last_error = e
                status = refusal_status(e)
                if status is not None:
                    self.refused = TrackingRefused(explain_refusal(self.delivery.uri, e, status))
                    print(f"=> tracking stopped: {self.refused}. The run goes on; its records stay in "
                          f"{self.delivery.journal.dir} for `dlops sync`", flush=True)  # fmt: skip
                    return
                self._stopping.wait(backoff)
                backoff = min(2 * backoff, BACKOFF_MAX_S)
                continue
            self._idle.set()
            self._wake.wait(timeout=1.0)
            self._wake.clear()

    def drain(self, timeout_s: float, say: Callable[[str], None] = print) -> bool:
        """Wait until every record is delivered, at most `timeout_s`, saying how it goes."""
        journal = self.delivery.journal
        deadline = time.monotonic() + timeout_s
        next_report = time.monotonic() + 5.0
        self.notify()
        while journal.pending > 0 and time.monotonic() < deadline and self.refused is None:
            if time.monotonic() >= next_report:
                why = f" (last error: {self.last_error})" if self.last_error else ""
                say(f"=> delivering tracking records to {redact(self.delivery.uri)}: {journal.pending} left{why}")
                next_report += 5.0
            time.sleep(0.1)
        return journal.pending == 0

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()
        self.join(timeout=5.0)


def http_client_settings(uri: str) -> None:
    """Let each MLflow HTTP call fail fast: the sender retries an outage with its own backoff, without limit.
    (MLflow's defaults retry about 4 minutes inside one call.) Variables already set are kept."""
    if uri.startswith(("http://", "https://")):
        os.environ.setdefault(environment.HTTP_MAX_RETRIES, "0")
        os.environ.setdefault(environment.HTTP_TIMEOUT, "30")
