"""Every check of a served version is an MLflow run in the `monitoring` experiment, linked to the version.

params   model_version (NAME/VERSION), monitor_check (drift or feedback), window_start, window_end
metrics  drift:    logged_requests, reference_requests, drift_share, embedding_drift_score,
                   drift_score/<column> (Evidently's figure per column: a p-value or a distance)
         feedback: feedback_matched, feedback_unmatched, live_<quality> (0..1), and
                   registered_<quality>: the validation figure the version was registered with
tags     job=monitor, drift_verdict (drift checks); on the version: monitor_run, drift_verdict
artifacts  drift_report/evidently_report.html (Evidently's own report)
"""

from __future__ import annotations

from typing import Any

from mlflow.entities import Metric, Param

from training.tracking import ensure_experiment, store_client
from training.tracking.tags import JOB_TAG, MONITOR, MONITOR_RUN

EXPERIMENT = "monitoring"
MODEL_VERSION, CHECK, WINDOW_START, WINDOW_END = "model_version", "monitor_check", "window_start", "window_end"
LOGGED_REQUESTS, REFERENCE_REQUESTS = "logged_requests", "reference_requests"
DRIFT_SHARE, EMBEDDING_DRIFT, DRIFT_SCORE_PREFIX = "drift_share", "embedding_drift_score", "drift_score/"
FEEDBACK_MATCHED, FEEDBACK_UNMATCHED = "feedback_matched", "feedback_unmatched"
LIVE_PREFIX, REGISTERED_PREFIX = "live_", "registered_"
REPORT_FOLDER = "drift_report"
DRIFT_CHECK, FEEDBACK_CHECK = "drift", "feedback"  # the monitor_check param
DRIFT, NO_DRIFT, NOT_ENOUGH = "drift", "no drift", "not enough data"  # the drift_verdict tag


def record_check(*, name: str, version: str, check: str, window: tuple[float, float], metrics: dict[str, float],
                 tags: dict[str, str] | None = None, artifact: Any = None, client: Any = None) -> str:  # fmt: skip
    """Log one check as a finished run and point the version's monitor_run tag at it; return the run id."""
    import time

    client = client or store_client()
    experiment = ensure_experiment(EXPERIMENT, client)
    run = client.create_run(experiment, run_name=f"{check} {name}/{version}", tags={JOB_TAG: MONITOR, **(tags or {})})
    run_id = run.info.run_id
    params = {MODEL_VERSION: f"{name}/{version}", CHECK: check,
              WINDOW_START: _iso(window[0]), WINDOW_END: _iso(window[1])}  # fmt: skip
    now = int(time.time() * 1000)
    client.log_batch(run_id, params=[Param(k, v) for k, v in params.items()],
                     metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items() if v == v])  # fmt: skip
    if artifact is not None:
        client.log_artifact(run_id, str(artifact), REPORT_FOLDER)
    client.set_terminated(run_id, "FINISHED")
    client.set_model_version_tag(name, version, MONITOR_RUN, run_id)
    for key, value in (tags or {}).items():
        client.set_model_version_tag(name, version, key, value)
    return run_id


def _iso(at: float) -> str:
    import datetime

    return datetime.datetime.fromtimestamp(at, tz=datetime.UTC).isoformat(timespec="seconds")
