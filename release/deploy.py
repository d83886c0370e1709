"""Put a model version in front of users on a running server, with no request dropped.

    dlops deploy models:/resnet-tinyimagenet@champion     # or a checkpoint file, or a .mar
    dlops rollback resnet                                  # what served before, the same way

A deploy, against the server of one state dir:
  1. package the source as a versioned .mar in the server's model store (earlier ones stay);
  2. register it as a new version through the management API (asynchronously: a synchronous
     registration holds the serving version's requests) and wait until its workers are READY (with
     `yield_cpu`, they start at the lowest CPU priority: release/priority.py);
  3. check it: the job's example request, sent to the new version, answers 200 with what the
     checkpoint computes here (the job's Serving.answer); its workers go back to their priority;
  4. make it the default version: new requests go to it;
  5. drain the old version: requests queued on it before the switch are answered first (every old
     worker answers a request sent after the switch), then unregister it (its .mar stays);
  6. record what serves: serving.json in the state dir, and in the MLflow registry an alias
     (`serving` by default) on the version now answering, the event as a version tag.
A failure before step 4 removes the new version and raises DeployError: the old one never stopped.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
import time
import urllib.parse
import zipfile
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any

import torch

from release.history import DeploymentRun
from release.package import ModelSettings, build_mar, read_archive_meta, resolve_source
from release.priority import LOWEST, StartingWorkers, local_server, may_raise_priority
from serving import served
from serving.client import WORKER_HEADER, Answer, ServerClient, read_server_file
from serving.fleet import start_fleet
from serving.served import Deployment
from serving.server import (
    ServeError,
    ServeOptions,
    log_size,
    mar_identity,
    model_log,
    running_pid,
    start,
    wait_ready,
    workers,
)
from training.checkpoint import load_checkpoint
from training.hardware import cpu_facts, resolve_amp
from training.jobs import job_for
from training.tracking import registry
from training.tracking.tags import SERVING_ALIAS

DRAIN_GRACE_S = 0.5  # a request that read the old default just before the switch is queued by then


class DeployError(RuntimeError):
    """A deploy that did not happen; the old version still serves."""


@dataclass(kw_only=True, frozen=True)
class Candidate:
    """An archive in the server's model store, ready to register, and what it must answer."""

    mar: Path
    model: str
    version: str
    kind: str
    state: dict[str, Any]  # weights and inference entries: the offline answer is computed from them
    registered: str | None
    source: str


def _archive_state(mar: Path) -> dict[str, Any]:
    """The checkpoint entries an archive holds (weights and meta.json), for the offline check."""
    with zipfile.ZipFile(mar) as zf:
        manifest = json.loads(zf.read("MAR-INF/MANIFEST.json"))["model"]
        weights = torch.load(BytesIO(zf.read(manifest["serializedFile"])), map_location="cpu", weights_only=True)
    return {**read_archive_meta(mar), "model": weights}


def candidate_from_archive(mar: Path, store: Path, source: str = "", registered: str | None = None) -> Candidate:
    """A .mar (copied into the store when it is elsewhere) as a deploy candidate."""
    store.mkdir(parents=True, exist_ok=True)
    if mar.resolve().parent != store.resolve():
        target = store / mar.name
        if target.exists():
            raise DeployError(f"{target} exists already: rename {mar} or deploy that one")
        mar = Path(shutil.copy(mar, target))
    state = _archive_state(mar)
    model, version = mar_identity(mar)
    return Candidate(
        mar=mar,
        model=model,
        version=version,
        kind=state["kind"],
        state=state,
        registered=registered or state.get("registered"),
        source=source or str(mar),
    )


def prepare(source: str, store: Path, settings: ModelSettings | None = None) -> Candidate:
    """A model URI, a checkpoint file or a .mar, packaged into `store` as a deploy candidate."""
    if source.endswith(".mar"):
        if not Path(source).is_file():
            raise DeployError(f"{source}: no such archive")
        return candidate_from_archive(Path(source), store, source)
    with tempfile.TemporaryDirectory() as tmp:
        resolved = resolve_source(source, None, None, Path(tmp))
        kind = load_checkpoint(resolved.path)["kind"]
        mar = build_mar(kind, resolved, store=store, settings=settings)
    return candidate_from_archive(mar, store, source, resolved.registered)


def _served_amp(client: ServerClient) -> str:
    """The precision the server's classifier runs in on this machine (the offline check uses the same)."""
    requested = read_server_file(client.state_dir).get("options", {}).get("amp", "auto")
    return resolve_amp(requested, "cpu", cpu_facts()).amp


def check(client: ServerClient, candidate: Candidate) -> None:
    """The job's example request, sent to the candidate's version, must answer what the checkpoint
    computes here; raise DeployError saying how it differs."""
    serving = job_for(candidate.kind).serving
    request = serving.example_request(candidate.state)
    answer = client.predict_fields(candidate.model, request, version=candidate.version)
    if not answer.ok:
        raise DeployError(f"the check request to {candidate.model} version {candidate.version} answered "
                          f"HTTP {answer.status}: {answer.data}")  # fmt: skip
    amp = _served_amp(client)
    mismatch = serving.mismatch(answer.data, serving.answer(candidate.state, request, amp), amp)
    if mismatch:
        raise DeployError(f"{candidate.model} version {candidate.version} answers the check request differently "
                          f"from its checkpoint: {mismatch}")  # fmt: skip


def _management(client: ServerClient, method: str, path: str, timeout_s: float) -> Answer:
    answer = client.management(method, path, timeout_s=timeout_s)
    if not answer.ok:
        raise DeployError(f"{method} {path}: HTTP {answer.status}: {answer.data}")
    return answer


def _register(client: ServerClient, candidate: Candidate, timeout_s: float, *, synchronously: bool = False) -> None:
    """Register the candidate as a new version and wait until its workers are READY. Asynchronously: while a
    synchronous registration of a new version is under way, TorchServe holds the requests for the model's
    serving version too (the requests sent at its start waited 2-3 s: docs/benchmarks.md;
    `synchronously` is kept to measure that, bench/deploy_load.py)."""
    mode = "true" if synchronously else "false"
    query = urllib.parse.urlencode({"url": candidate.mar.name, "model_name": candidate.model, "synchronous": mode})
    log_offset = log_size(model_log(client))
    try:
        answer = client.management("POST", f"/models?{query}", timeout_s=timeout_s)
    except OSError as e:
        raise DeployError(f"registering {candidate.mar.name}: {e}") from e
    if answer.status not in (200, 202):  # 202: accepted, its workers are starting
        raise DeployError(f"POST /models?{query}: HTTP {answer.status}: {answer.data}")
    wait_ready(client, candidate.model, candidate.version, timeout_s, log_offset=log_offset)


def remove_version(client: ServerClient, model: str, version: str) -> None:
    """Unregister a version (its archive stays in the store); quietly when it is not registered."""
    client.management("DELETE", f"/models/{model}/{version}", timeout_s=120)


def default_version(client: ServerClient, model: str) -> str | None:
    """The version of `model` that answers /predictions/<model> now, as the server says; None if it has none."""
    answer = client.management("GET", f"/models/{model}", timeout_s=30)
    if answer.status == 404:
        return None
    if not answer.ok or not isinstance(answer.data, list) or not answer.data:
        raise DeployError(f"GET /models/{model}: HTTP {answer.status}: {answer.data}")
    return str(answer.data[0]["modelVersion"])


def _is_registered(client: ServerClient, model: str, version: str) -> bool:
    return client.management("GET", f"/models/{model}/{version}", timeout_s=30).ok


def drain(client: ServerClient, model: str, version: str, request: dict[str, Any], timeout_s: float) -> bool:
    """Wait until every worker of `version` (no longer the default) has answered a request sent now:
    it takes requests in order, so whatever was queued on it before is answered by then."""
    pending = {str(w.get("pid")) for w in workers(client, model, version)}
    time.sleep(DRAIN_GRACE_S)
    deadline = time.monotonic() + timeout_s
    while pending and time.monotonic() < deadline:
        answer = client.predict_fields(model, request, version=version)
        worker = answer.headers.get(WORKER_HEADER)
        if worker in pending:
            pending.discard(worker)
        elif worker is None and answer.ok:  # an archive of an earlier release names no worker: count answers
            pending.pop()
    return not pending


def record_deploy(state_dir: Path, deployment: Deployment, alias: str, retired: Deployment | None) -> None:
    """serving.json, then the registry (an outage of the tracking server is a warning, not a failure)."""
    served.record(state_dir, deployment)
    where = f"{Path(state_dir).resolve()}"
    try:
        if deployment.registered:
            name, version = deployment.registered.split("/")
            registry.record_event(name, version, f"{deployment.event}: serving as {deployment.model} version "
                                  f"{deployment.version} from {where}", alias=alias)  # fmt: skip
        if retired and retired.registered and retired.registered != deployment.registered:
            name, version = retired.registered.split("/")
            registry.record_event(name, version, f"retired: {deployment.describe()} replaced it on {where}")
    except Exception as e:  # noqa: BLE001 - the deploy happened; only its record in MLflow is late
        print(f"warning: the MLflow registry was not updated ({e}); serving.json in {where} records the deploy")


def record_failure(candidate: Candidate, state_dir: Path, reason: str) -> None:
    if not candidate.registered:
        return
    try:
        name, version = candidate.registered.split("/")
        registry.record_event(name, version, f"deploy to {Path(state_dir).resolve()} failed: {reason}")
    except Exception:  # noqa: BLE001, S110 - a failed deploy is reported either way
        pass


def _serving(client: ServerClient, model: str) -> Deployment | None:
    """What answers `model` now: the server's default version, described by serving.json when it knows it."""
    version = default_version(client, model)
    if version is None:
        return None
    known = served.current(client.state_dir, model)
    return (
        known
        if known is not None and known.version == version
        else Deployment(model=model, version=version, mar="", event="")
    )


def _priority_watch(client: ServerClient, *, yield_cpu: bool) -> contextlib.AbstractContextManager:
    """What lowers the new workers' priority while they start (release/priority.py), or nothing: when not
    asked, when this process could not give the priority back, or when the server is not this machine's."""
    if not yield_cpu:
        return contextlib.nullcontext()
    server = local_server(running_pid(client.state_dir))
    if server is None:
        print("=> the new workers start at the serving workers' priority: the server's processes are not this "
              "machine's (a container?)")  # fmt: skip
        return contextlib.nullcontext()
    if not may_raise_priority():
        print("=> the new workers start at the serving workers' priority: giving it back after a lower one needs "
              "root or CAP_SYS_NICE")  # fmt: skip
        return contextlib.nullcontext()
    return StartingWorkers(server)


def start_candidate(client: ServerClient, candidate: Candidate, timeout_s: float, *, yield_cpu: bool, started: float,
           synchronously: bool = False) -> None:  # fmt: skip
    """Register the candidate, wait for its workers, check it; with `yield_cpu` its workers run at the lowest
    priority until then (the serving version keeps the CPU), at their own from its first real request."""
    new = f"{candidate.model} version {candidate.version}"
    with _priority_watch(client, yield_cpu=yield_cpu) as starting:
        _register(client, candidate, timeout_s, synchronously=synchronously)
        print(f"=> {new}: workers READY after {time.perf_counter() - started:.1f} s", flush=True)
        check(client, candidate)
        print("=> check passed: the example request answers what the checkpoint computes", flush=True)
    if isinstance(starting, StartingWorkers) and starting.count:
        print(f"=> its {starting.count} worker(s) started at nice {LOWEST} and run at normal priority now")


def deploy(client: ServerClient, candidate: Candidate, alias: str = SERVING_ALIAS, timeout_s: float = 180.0,
           event: str = "deploy", *, yield_cpu: bool = False,
           register_synchronously: bool = False) -> Deployment:  # fmt: skip
    """Make `candidate` the version that answers, with no request dropped (steps in the module doc).
    `register_synchronously` is the way of releases before 2026-12 (requests held while the new workers
    start), kept for bench/deploy_load.py to measure against."""
    start_time = time.perf_counter()
    old = _serving(client, candidate.model)
    new = Deployment(
        model=candidate.model,
        version=candidate.version,
        mar=candidate.mar.name,
        source=candidate.source,
        registered=candidate.registered,
        event=event,
    )
    if old is not None and old.version == candidate.version:
        print(f"=> {old.describe()} is serving already")
        return old
    print(f"=> {event} {new.describe()} to {client.urls['management']}"
          + (f"; {old.describe()} answers until it is ready" if old else ""), flush=True)  # fmt: skip
    run = DeploymentRun(model=candidate.model, event=event, to_version=candidate.version,
                        from_version=old.version if old else None, registered=candidate.registered,
                        where=str(Path(client.state_dir).resolve()))  # fmt: skip
    if _is_registered(client, candidate.model, candidate.version):  # a leftover, not the default
        remove_version(client, candidate.model, candidate.version)
    try:
        start_candidate(
            client, candidate, timeout_s, yield_cpu=yield_cpu, started=start_time, synchronously=register_synchronously
        )
        if old is not None:
            _management(client, "PUT", f"/models/{candidate.model}/{candidate.version}/set-default", 60)
    except (DeployError, ServeError, OSError) as e:
        if old is not None or _is_registered(client, candidate.model, candidate.version):
            remove_version(client, candidate.model, candidate.version)
        record_failure(candidate, client.state_dir, str(e))
        run.end("failed", str(e))
        still = f"{old.describe()} still serves" if old else "nothing served it before"
        raise DeployError(f"deploy of {new.describe()} failed: {e}. {still}; the new version was removed") from e
    print(f"=> {new.describe()} answers /predictions/{candidate.model} "
          f"({time.perf_counter() - start_time:.1f} s after the start)", flush=True)  # fmt: skip
    if old is not None:
        request = job_for(candidate.kind).serving.example_request(candidate.state)
        if drain(client, candidate.model, old.version, request, timeout_s):
            remove_version(client, candidate.model, old.version)
            print(f"=> drained and unregistered {old.describe()} (its .mar stays for a rollback)")
        else:
            print(f"warning: {old.describe()} still had requests after {timeout_s:.0f} s; it stays registered "
                  "(no longer the default). `dlops deploy` again later retires it")  # fmt: skip
    record_deploy(client.state_dir, new, alias, old)
    run.end("deployed", "the check passed")
    return new


def rollback_candidate(client: ServerClient, model: str) -> Candidate:
    """The version that served `model` before the current one, as a deploy candidate (its archive is kept)."""
    target = served.previous(client.state_dir, model)
    if target is None:
        known = ", ".join(served.history(client.state_dir)) or "none"
        raise DeployError(f"no earlier version of {model!r} served from {client.state_dir} (models with a "
                          f"history: {known})")  # fmt: skip
    store = Path(client_store(client))
    mar = store / target.mar
    if not mar.is_file():
        raise DeployError(f"{mar} is gone: the version to roll back to cannot be registered again")
    return candidate_from_archive(mar, store, target.source, target.registered)


def rollback(client: ServerClient, model: str, alias: str = SERVING_ALIAS, timeout_s: float = 180.0, *,
             yield_cpu: bool = False) -> Deployment:  # fmt: skip
    """Serve again, the same way as a deploy, the version that served `model` before the current one."""
    return deploy(client, rollback_candidate(client, model), alias, timeout_s, event="rollback", yield_cpu=yield_cpu)


def client_store(client: ServerClient) -> str:
    store = read_server_file(client.state_dir).get("model_store")
    if not store:
        raise DeployError(f"no server was started from {client.state_dir} (no server.json): `dlops serve` first, "
                          "or give --model-store")  # fmt: skip
    return store


def mars_to_serve(store: Path, state_dir: Path) -> list[Path]:
    """Without --model: what the state dir served last, and for other models in the store their newest archive."""
    chosen = served.last_archives(state_dir, store)
    newest: dict[str, Path] = {}
    for mar in sorted(store.glob("*.mar"), key=lambda p: p.stat().st_mtime):  # oldest first: the newest stays
        newest[mar_identity(mar)[0]] = mar
    return [*chosen.values(), *(mar for name, mar in newest.items() if name not in chosen)]


def serve(options: ServeOptions, sources: list[str], settings: ModelSettings | None = None,
          alias: str = SERVING_ALIAS, *, servers: int | None = None) -> ServerClient:  # fmt: skip
    """`dlops serve`: package what `sources` name (model URIs, checkpoints, archives) into the model
    store, or take what the state dir served last, and start the server with it (`servers`: a fleet of
    that many behind the gateway, serving/fleet.py)."""
    store = options.model_store
    candidates = {c.mar.name: c for c in (prepare(source, store, settings) for source in sources)}
    mars = [c.mar for c in candidates.values()] if candidates else mars_to_serve(store, options.state_dir)
    client = start_fleet(options, mars, servers).client if servers else start(options, mars)
    for mar in mars:
        model, version = mar_identity(mar)
        origin, meta = candidates.get(mar.name), read_archive_meta(mar)
        now = served.current(options.state_dir, model)
        if now is not None and (now.version, now.mar) == (version, mar.name):
            continue  # serving again what it served: the history has it
        deployment = Deployment(
            model=model,
            version=version,
            mar=mar.name,
            source=origin.source if origin else meta.get("source") or "",
            registered=origin.registered if origin else meta.get("registered"),
            event="serve",
        )
        record_deploy(options.state_dir, deployment, alias, now)
    return client
