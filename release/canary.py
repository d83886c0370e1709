"""Deploys on a fleet (serving/fleet.py): every server at once, or a canary that judges itself.

    dlops deploy models:/resnet-tinyimagenet@champion --state-dir logs/fleet --canary [--policy canary.yaml]

A rollout:
  1. registers the new version on every server of the fleet beside the stable one and runs the
     offline check on each (release/deploy.py: the job's example request answers what its checkpoint
     computes); a failure removes it everywhere, and nothing else happened;
  2. with a canary policy, steps through traffic shares (5, 10, 25, 50 % by default): the gateway
     sends that share of /predictions/<model> to the new version; after `interval_s`, and once the
     canary has at least `min_requests` requests, the canary and the stable version are compared on
     the same window of real requests (the gateway's log): error rate (5xx, timeouts) and p99 latency
     ratio. Too few requests is not a pass: the step waits, up to `max_wait_s`, then the canary ends
     inconclusive. A failed check aborts: the canary's share goes to 0 at once, the version is
     unregistered, the alias stays, the version is tagged with the reason;
  3. promotes: the gateway sends every request to the new version, each server makes it its default,
     drains the old one and unregisters it; serving.json and the alias record it.
Ctrl-C or SIGTERM during a rollout ends it as an abort would: the stable version answers everything.
Each rollout is an MLflow run (release/history.py).
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from release import history
from release.deploy import (
    Candidate,
    DeployError,
    drain,
    record_deploy,
    record_failure,
    remove_version,
    start_candidate,
)
from release.history import DeploymentRun
from serving import gateway, served
from serving.fleet import Fleet
from serving.served import Deployment
from serving.server import ServeError
from training.jobs import job_for
from training.tracking import store_client
from training.tracking.tags import CANARY_ABORTED, SERVING_ALIAS

POLL_S = 0.5


@dataclass(kw_only=True, frozen=True)
class CanaryPolicy:
    steps: tuple[int, ...] = (5, 10, 25, 50)  # the canary's share of requests at each step, in %
    interval_s: float = 30.0  # how long a step runs before it is judged
    min_requests: int = 50  # canary requests a step needs before it can pass
    max_wait_s: float = 300.0  # a step still short of requests by then ends the canary inconclusive
    max_error_rate: float = 0.01  # the canary's share of 5xx and timeouts; above it, abort
    max_p99_ratio: float = 2.0  # the canary's p99 over the stable version's, same window; above it, abort

    def __post_init__(self) -> None:
        if not self.steps or any(not 0 < s <= 100 for s in self.steps) or list(self.steps) != sorted(self.steps):
            raise ValueError(f"canary steps are rising shares of requests in %, each in 1-100; got {self.steps}")
        if self.min_requests < 1 or self.interval_s <= 0 or self.max_wait_s < self.interval_s:
            raise ValueError("a canary policy needs min_requests >= 1, interval_s > 0 and max_wait_s >= interval_s")

    @classmethod
    def for_job(cls, kind: str | None, path: Path | None = None) -> CanaryPolicy:
        """The defaults, then the thresholds job `kind` declares (its Serving.canary), then the file's keys
        (YAML or JSON) when one is given."""
        declared = dict(job_for(kind).serving.canary) if kind else {}
        raw = (yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}) if path else {}
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known) if isinstance(raw, dict) else ["(not a mapping)"]
        unknown += sorted(f"{k} (declared by the {kind} job)" for k in set(declared) - known)
        if unknown:
            raise ValueError(f"{path or kind}: unknown canary policy key(s) {', '.join(unknown)}; known: "
                             f"{', '.join(sorted(known))}")  # fmt: skip
        chosen = {**declared, **raw}
        if "steps" in chosen:
            chosen["steps"] = tuple(int(s) for s in chosen["steps"])
        return cls(**chosen)

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "steps": list(self.steps)}


@dataclass(kw_only=True, frozen=True)
class Verdict:
    passed: bool | None  # None: not enough requests yet
    reason: str
    canary: gateway.Traffic
    stable: gateway.Traffic


NO_TRAFFIC = gateway.Traffic(requests=0, errors=0, p99_ms=float("nan"))


def judge(policy: CanaryPolicy, canary: gateway.Traffic, stable: gateway.Traffic) -> Verdict:
    """Compare the canary with the stable version on one window of requests."""
    if canary.requests < policy.min_requests:
        return Verdict(passed=None, reason=f"{canary.requests} canary request(s), {policy.min_requests} needed",
                       canary=canary, stable=stable)  # fmt: skip
    if canary.error_rate > policy.max_error_rate:
        return Verdict(passed=False, reason=f"error rate {canary.error_rate:.1%} ({canary.errors} of "
                       f"{canary.requests}) above {policy.max_error_rate:.1%} (stable: {stable.error_rate:.1%})",
                       canary=canary, stable=stable)  # fmt: skip
    if stable.requests and stable.p99_ms > 0 and canary.p99_ms / stable.p99_ms > policy.max_p99_ratio:
        return Verdict(passed=False, reason=f"p99 {canary.p99_ms:.0f} ms, {canary.p99_ms / stable.p99_ms:.1f}x "
                       f"the stable version's {stable.p99_ms:.0f} ms (at most {policy.max_p99_ratio:g}x)",
                       canary=canary, stable=stable)  # fmt: skip
    return Verdict(passed=True, reason=f"error rate {canary.error_rate:.1%}, p99 {canary.p99_ms:.0f} ms vs "
                   f"{stable.p99_ms:.0f} ms over {canary.requests} + {stable.requests} requests",
                   canary=canary, stable=stable)  # fmt: skip


@contextmanager
def _signals_deferred() -> Iterator[None]:
    """SIGTERM and SIGINT wait until the block is done (the gateway already sends everything to the new version:
    the servers must follow), then take effect."""
    received: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, frame: received.append(signum))
                for sig in (signal.SIGTERM, signal.SIGINT)}  # fmt: skip
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if received:
        print(f"=> {signal.Signals(received[0]).name} arrived while the promotion finished; stopping now", flush=True)
        signal.raise_signal(received[0])


class Interrupted(Exception):
    """Ctrl-C or SIGTERM during a rollout."""


class RolloutEnded(DeployError):
    """A rollout that left the stable version serving; `outcome` says how (aborted, inconclusive, interrupted)."""

    def __init__(self, outcome: str, message: str):
        super().__init__(message)
        self.outcome = outcome


@contextmanager
def _interruptible() -> Iterator[None]:
    """SIGTERM raises Interrupted as Ctrl-C does, so either ends the rollout through its cleanup."""

    def on_term(signum: int, frame: Any) -> None:
        raise Interrupted(signal.Signals(signum).name)

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    except KeyboardInterrupt as e:
        raise Interrupted("SIGINT") from e
    finally:
        signal.signal(signal.SIGTERM, previous)


def _figures(weight: int, verdict: Verdict) -> dict[str, float]:
    canary, stable = verdict.canary, verdict.stable
    return {history.WEIGHT: weight,
            history.CANARY_REQUESTS: canary.requests, history.CANARY_ERROR_RATE: canary.error_rate,
            history.CANARY_P99_MS: canary.p99_ms,
            history.STABLE_REQUESTS: stable.requests, history.STABLE_ERROR_RATE: stable.error_rate,
            history.STABLE_P99_MS: stable.p99_ms}  # fmt: skip


def run_steps(fleet: Fleet, model: str, canary_version: str, policy: CanaryPolicy, run: DeploymentRun) -> str:
    """The canary's steps; return why it passed, or raise RolloutEnded (its share already back to 0)."""
    for step, weight in enumerate(policy.steps, start=1):
        gateway.route(fleet.gateway_dir, model, canary=canary_version, weight=weight)
        began = time.time()
        print(f"=> step {step}/{len(policy.steps)}: {weight}% of /predictions/{model} to version {canary_version}",
              flush=True)  # fmt: skip
        verdict = None
        while True:
            time.sleep(POLL_S)
            waited = time.time() - began
            if waited < policy.interval_s:
                continue
            seen = gateway.traffic(fleet.gateway_dir, model, since=began)
            verdict = judge(policy, seen.get(gateway.CANARY, NO_TRAFFIC), seen.get(gateway.STABLE, NO_TRAFFIC))
            if verdict.passed is not None or waited >= policy.max_wait_s:
                break
        run.log_step(step, _figures(weight, verdict))
        if verdict.passed is None:
            raise RolloutEnded("inconclusive", f"step {step} ({weight}%) got {verdict.reason} within "
                               f"{policy.max_wait_s:g} s: not enough traffic to judge")  # fmt: skip
        if not verdict.passed:
            raise RolloutEnded("aborted", f"step {step} ({weight}%): {verdict.reason}")
        print(f"=> step {step} passed: {verdict.reason}", flush=True)
    return f"all {len(policy.steps)} steps passed"


def _stable(fleet: Fleet, model: str) -> Deployment | None:
    version = gateway.read_map(fleet.gateway_dir, "stable").get(model)
    known = served.current(fleet.state_dir, model)
    if version is None:
        return None
    return known if known and known.version == version else Deployment(model=model, version=version, mar="", event="")


def _start_everywhere(fleet: Fleet, candidate: Candidate, timeout_s: float) -> None:
    started = time.perf_counter()
    for server in fleet.live_servers():
        if server.management("GET", f"/models/{candidate.model}/{candidate.version}", timeout_s=30).ok:
            remove_version(server, candidate.model, candidate.version)  # a leftover of an earlier try
        start_candidate(server, candidate, timeout_s, yield_cpu=False, started=started)


def _retire(fleet: Fleet, candidate: Candidate, old: Deployment, timeout_s: float) -> None:
    """Every server: the new version is the default, the old one drained and unregistered."""
    request = job_for(candidate.kind).serving.example_request(candidate.state)
    for server in fleet.live_servers():
        server.management("PUT", f"/models/{candidate.model}/{candidate.version}/set-default", timeout_s=60)
        if drain(server, candidate.model, old.version, request, timeout_s):
            remove_version(server, candidate.model, old.version)
        else:
            print(f"warning: {old.describe()} still had requests on {server.state_dir} after {timeout_s:.0f} s; it "
                  "stays registered there (no longer the default)")  # fmt: skip


def _abandon(fleet: Fleet, candidate: Candidate, timeout_s: float) -> None:
    """The canary takes no new request, answers those it holds (TorchServe drops a removed version's queue
    unanswered), and leaves every server."""
    gateway.route(fleet.gateway_dir, candidate.model, clear_canary=True)
    request = job_for(candidate.kind).serving.example_request(candidate.state)
    for server in fleet.live_servers():
        try:
            if server.management("GET", f"/models/{candidate.model}/{candidate.version}", timeout_s=30).ok:
                drain(server, candidate.model, candidate.version, request, timeout_s)
            remove_version(server, candidate.model, candidate.version)
        except OSError as e:  # a server that died meanwhile has nothing left to remove
            print(f"warning: {server.state_dir}: {e}")


def _tag_aborted(candidate: Candidate, reason: str) -> None:
    if not candidate.registered:
        return
    try:
        name, version = candidate.registered.split("/")
        store_client().set_model_version_tag(name, version, CANARY_ABORTED, reason[:5000])
    except Exception as e:  # noqa: BLE001 - the abort happened; only its record is missing
        print(f"warning: the abort was not tagged on {candidate.registered} ({e})")


def rollout(fleet: Fleet, candidate: Candidate, *, policy: CanaryPolicy | None = None, alias: str = SERVING_ALIAS,
            timeout_s: float = 180.0, event: str = "deploy") -> Deployment:  # fmt: skip
    """Make `candidate` the version the fleet answers with: at once, or through a canary (`policy`)."""
    old = _stable(fleet, candidate.model)
    new = Deployment(model=candidate.model, version=candidate.version, mar=candidate.mar.name,
                     source=candidate.source, registered=candidate.registered, event=event)  # fmt: skip
    if old is not None and old.version == candidate.version:
        print(f"=> {old.describe()} is serving already")
        return old
    how = "through a canary" if policy else "on every server at once"
    print(f"=> {event} {new.describe()} to the fleet in {fleet.state_dir} ({len(fleet.members)} server(s)) {how}"
          + (f"; {old.describe()} answers meanwhile" if old else ""), flush=True)  # fmt: skip
    run = DeploymentRun(model=candidate.model, event=event + (" (canary)" if policy else ""),
                        to_version=candidate.version, from_version=old.version if old else None,
                        registered=candidate.registered, where=str(Path(fleet.state_dir).resolve()),
                        policy=policy.as_dict() if policy else None)  # fmt: skip
    try:
        with _interruptible():
            try:
                _start_everywhere(fleet, candidate, timeout_s)
            except (DeployError, ServeError, OSError) as e:
                raise RolloutEnded("failed", f"the new version did not start on every server: {e}") from e
            print("=> every server has the new version READY and it passed the check", flush=True)
            reason = run_steps(fleet, candidate.model, candidate.version, policy, run) if policy and old else ""
            gateway.route(fleet.gateway_dir, candidate.model, stable=candidate.version, clear_canary=True)
    except (RolloutEnded, Interrupted) as e:
        outcome = e.outcome if isinstance(e, RolloutEnded) else "interrupted"
        message = str(e) if isinstance(e, RolloutEnded) else f"stopped by {e}"
        _abandon(fleet, candidate, timeout_s)
        record_failure(candidate, fleet.state_dir, f"{outcome}: {message}")
        if outcome == "aborted":
            _tag_aborted(candidate, message)
        run.end(outcome, message)
        still = f"{old.describe()} still answers every request" if old else "nothing served it before"
        raise RolloutEnded(outcome, f"{event} of {new.describe()} {outcome}: {message}. {still}; the new version "
                           "was removed from every server") from e  # fmt: skip
    print(f"=> {new.describe()} answers every request of /predictions/{candidate.model}", flush=True)
    with _signals_deferred():
        if old is not None:
            _retire(fleet, candidate, old, timeout_s)
        record_deploy(fleet.state_dir, new, alias, old)
        run.end("promoted" if policy and old else "deployed", reason or "the check passed on every server")
    return new
