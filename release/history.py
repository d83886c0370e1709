"""Every deploy is a tracked run: an MLflow run in the `deployments` experiment per deploy, canary or
rollback, with the versions, the policy, each step's figures (metrics by step) and the outcome.

The deploy does not wait on MLflow: when the tracking server cannot be reached, the deploy goes on,
says so, and serving.json keeps its record.
"""

from __future__ import annotations

import json
import time
from typing import Any

from mlflow.entities import Metric, Param, RunTag

from training.tracking import ensure_experiment, store_client
from training.tracking.tags import DEPLOYMENT, DEPLOYMENT_RUN, JOB_TAG, OUTCOME, REASON

DEPLOYMENTS = "deployments"  # the experiment of deploy runs
# its params
SERVED_MODEL, DEPLOY_EVENT, FROM_VERSION, TO_VERSION = "served_model", "deploy_event", "from_version", "to_version"
REGISTERED_VERSION, SERVED_FROM, CANARY_POLICY = "registered_version", "served_from", "canary_policy"
# its metrics, by step: the canary's share, and what each version's requests saw in the step's window
WEIGHT = "weight_percent"
CANARY_REQUESTS, CANARY_ERROR_RATE, CANARY_P99_MS = "canary_requests", "canary_error_rate", "canary_p99_ms"
STABLE_REQUESTS, STABLE_ERROR_RATE, STABLE_P99_MS = "stable_requests", "stable_error_rate", "stable_p99_ms"

FINISHED_OUTCOMES = ("deployed", "promoted")  # the version answers; any other outcome leaves the old one serving


class DeploymentRun:
    """One deploy's MLflow run; every call is a no-op (with one warning) once MLflow could not be reached."""

    def __init__(self, *, model: str, event: str, to_version: str, from_version: str | None,
                 registered: str | None, where: str, policy: dict[str, Any] | None = None):  # fmt: skip
        self.run_id: str | None = None
        self.registered = registered
        try:
            self.client = store_client()
            experiment = ensure_experiment(DEPLOYMENTS, self.client)
            run = self.client.create_run(experiment, run_name=f"{event} {model} {from_version or '-'} -> {to_version}",
                                         tags={JOB_TAG: DEPLOYMENT})  # fmt: skip
            self.run_id = run.info.run_id
            params = {SERVED_MODEL: model, DEPLOY_EVENT: event, FROM_VERSION: from_version or "",
                      TO_VERSION: to_version, REGISTERED_VERSION: registered or "", SERVED_FROM: where,
                      CANARY_POLICY: json.dumps(policy) if policy else "none"}  # fmt: skip
            self.client.log_batch(self.run_id, params=[Param(k, str(v)[:6000]) for k, v in params.items()])
        except Exception as e:  # noqa: BLE001 - a deploy does not stop for its record
            print(f"warning: the deploy is not recorded as an MLflow run ({e}); serving.json records it")

    def log_step(self, step: int, figures: dict[str, float]) -> None:
        if self.run_id is None:
            return
        now = int(time.time() * 1000)
        metrics = [Metric(k, float(v), now, step) for k, v in figures.items() if v == v]  # NaN: not measured
        try:
            self.client.log_batch(self.run_id, metrics=metrics)
        except Exception as e:  # noqa: BLE001
            print(f"warning: step {step} of the deploy was not logged to MLflow ({e})")

    def end(self, outcome: str, reason: str) -> None:
        if self.run_id is None:
            return
        status = "FINISHED" if outcome in FINISHED_OUTCOMES else "KILLED" if outcome == "interrupted" else "FAILED"
        try:
            self.client.log_batch(self.run_id, tags=[RunTag(OUTCOME, outcome), RunTag(REASON, reason[:5000])])
            self.client.set_terminated(self.run_id, status)
            if self.registered:
                name, version = self.registered.split("/")
                self.client.set_model_version_tag(name, version, DEPLOYMENT_RUN, self.run_id)
        except Exception as e:  # noqa: BLE001
            print(f"warning: the deploy's outcome was not recorded in MLflow ({e})")
