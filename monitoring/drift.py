"""Drift: does what a served version is asked still look like its validation data? Measured with Evidently.

The two sides are summaries in one form (the job's handler makes both, training/jobs/serving.py):
the version's reference profile (its training run's monitoring/reference.jsonl, recorded when it
was registered) and the prediction log's records of a window. Evidently tests each declared
column (numbers: Kolmogorov-Smirnov; categories such as the predicted class: chi-square; a column
drifted when the p-value is under the job's p_value), and the embedding as a whole (a classifier
trained to tell the two sets apart: drifted when its ROC AUC passes the job's embedding_auc). The
verdict, as the job declares it (Monitoring):

    "drift"             the drifted columns' share reached drift_share, or the embedding drifted
    "no drift"          neither
    "not enough data"   the window holds fewer than min_requests logged requests (never "no drift")
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from monitoring import MonitorError
from monitoring.predictions import Window, records
from monitoring.runs import (
    DRIFT,
    DRIFT_CHECK,
    DRIFT_SCORE_PREFIX,
    DRIFT_SHARE,
    EMBEDDING_DRIFT,
    LOGGED_REQUESTS,
    NO_DRIFT,
    NOT_ENOUGH,
    REFERENCE_REQUESTS,
    record_check,
)
from training.jobs.serving import Monitoring
from training.tracking.artifacts import MONITORING, REFERENCE_PROFILE
from training.tracking.tags import DRIFT_VERDICT


@dataclass(frozen=True, kw_only=True)
class Comparison:
    verdict: str
    requests: int  # logged requests in the window
    reference: int  # summaries in the reference profile
    drift_share: float | None = None  # the share of drifted columns
    scores: dict[str, float] = field(default_factory=dict)  # column -> the test's figure (a p-value, a distance)
    drifted: tuple[str, ...] = ()  # the columns (and the embedding) that drifted
    embedding_score: float | None = None
    snapshot: Any = None  # Evidently's result, for its HTML report


def table(summaries: list[dict], monitoring: Monitoring) -> tuple[Any, dict[str, list[str]]]:
    """Summaries as a DataFrame (the declared input numbers, answer categories and embedding columns),
    and the column groups: {"numeric": [...], "categorical": [...], "embedding": [...]}."""
    import pandas as pd

    rows = []
    for summary in summaries:
        given, answer = summary.get("input") or {}, summary.get("answer") or {}
        names = monitoring.numeric if monitoring.numeric is not None else [
            k for k, v in given.items() if isinstance(v, int | float) and not isinstance(v, bool)]  # fmt: skip
        row = {name: given.get(name) for name in names}
        row |= {name: str(answer.get(name)) for name in monitoring.categorical}
        embedding = given.get(monitoring.embedding) if monitoring.embedding else None
        if isinstance(embedding, list):
            row |= {f"{monitoring.embedding}_{i}": value for i, value in enumerate(embedding)}
        rows.append(row)
    frame = pd.DataFrame(rows)
    embedding = [c for c in frame.columns if monitoring.embedding and c.startswith(f"{monitoring.embedding}_")]
    categorical = [c for c in monitoring.categorical if c in frame.columns]
    numeric = [c for c in frame.columns if c not in embedding and c not in categorical]
    return frame, {"numeric": numeric, "categorical": categorical, "embedding": embedding}


def compare(reference: list[dict], current: list[dict], monitoring: Monitoring) -> Comparison:
    """Evidently's drift of `current` (a window's records) against `reference` (the profile)."""
    if len(current) < monitoring.min_requests:
        return Comparison(verdict=NOT_ENOUGH, requests=len(current), reference=len(reference))
    from evidently import DataDefinition, Dataset, Report
    from evidently.metrics import EmbeddingsDrift
    from evidently.metrics.embeddings import ModelDriftMethod
    from evidently.presets import DataDriftPreset

    reference_frame, groups = table(reference, monitoring)
    current_frame, _ = table(current, monitoring)
    current_frame = current_frame.reindex(columns=reference_frame.columns)
    if groups["embedding"]:  # in the reference's units: Evidently's classifier (SGD) needs scaled inputs
        columns = groups["embedding"]
        mean, std = reference_frame[columns].mean(), reference_frame[columns].std().replace(0, 1)
        reference_frame[columns] = (reference_frame[columns] - mean) / std
        current_frame[columns] = (current_frame[columns] - mean) / std
    embeddings = {monitoring.embedding: groups["embedding"]} if groups["embedding"] else None
    definition = DataDefinition(numerical_columns=groups["numeric"], categorical_columns=groups["categorical"],
                                embeddings=embeddings)  # fmt: skip
    columns = groups["numeric"] + groups["categorical"]
    # p-value tests at any size (Evidently would switch to distances past 1000 rows): the job's p_value holds
    preset = DataDriftPreset(columns=columns, drift_share=monitoring.drift_share, num_method="ks",
                             cat_method="chisquare", threshold=monitoring.p_value)  # fmt: skip
    metrics: list[Any] = [preset]
    if embeddings:
        method = ModelDriftMethod(threshold=monitoring.embedding_auc)
        metrics.append(EmbeddingsDrift(embeddings_name=monitoring.embedding, drift_method=method))
    with warnings.catch_warnings():  # its correlations divide by zero on constant columns (a fixed image size)
        warnings.simplefilter("ignore", RuntimeWarning)
        snapshot = Report(metrics).run(
            current_data=Dataset.from_pandas(current_frame, data_definition=definition),
            reference_data=Dataset.from_pandas(reference_frame, data_definition=definition),
        )
    return _judged(snapshot, len(current), len(reference), monitoring, columns)


def _judged(snapshot: Any, requests: int, reference: int, monitoring: Monitoring, columns: list[str]) -> Comparison:
    """The verdict from Evidently's figures: each column's test against its threshold, and the embedding's."""
    scores, drifted, embedding_score = {}, [], None
    for metric in snapshot.dict()["metrics"]:
        config, value = metric["config"], metric["value"]
        if config["type"].endswith("ValueDrift") and config["column"] in columns:
            scores[config["column"]] = float(value)  # a p-value: compare() asks for K-S and chi-square only
            if value < monitoring.p_value:
                drifted.append(config["column"])
        elif config["type"].endswith("EmbeddingsDrift"):
            embedding_score = float(value)
            if value > monitoring.embedding_auc:
                drifted.append(monitoring.embedding)
    share = sum(1 for c in drifted if c in columns) / len(columns) if columns else 0.0
    is_drift = share >= monitoring.drift_share or (monitoring.embedding in drifted)
    return Comparison(verdict=DRIFT if is_drift else NO_DRIFT, requests=requests, reference=reference,
                      drift_share=share, scores={k: v for k, v in scores.items() if math.isfinite(v)},
                      drifted=tuple(drifted), embedding_score=embedding_score, snapshot=snapshot)  # fmt: skip


def save_report(comparison: Comparison, path: Path) -> Path | None:
    """Evidently's own HTML report of the comparison (None when there was nothing to compare)."""
    if comparison.snapshot is None:
        return None
    comparison.snapshot.save_html(str(path))
    return path


def reference_profile(version: Any, client: Any) -> list[dict]:
    """The version's reference profile, from its training run's artifacts."""
    import json
    import tempfile

    if not version.run_id:
        raise MonitorError(f"{version.name}/{version.version} has no training run, so no reference profile")
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = client.download_artifacts(version.run_id, f"{MONITORING}/{REFERENCE_PROFILE}", tmp)
        except Exception as e:  # noqa: BLE001 - MLflow raises several kinds for a missing artifact
            raise MonitorError(f"{version.name}/{version.version}: its run {version.run_id} has no "
                               f"{MONITORING}/{REFERENCE_PROFILE} (registered before dlops recorded reference "
                               f"profiles, or its data was gone): retrain it to judge drift ({e})") from e  # fmt: skip
        return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def check_drift(uri: str, *, window: Window, log: Path, report_dir: Path) -> tuple[Comparison, str]:
    """Compare the logged requests of the version `uri` names in `window` with its reference profile; log
    the check as an MLflow run (Evidently's HTML report beside it) and tag the version; return both."""
    from training.jobs import jobs
    from training.tracking import registry, store_client

    client = store_client()
    version = registry.resolve(uri, client)
    kind = registry.job_kind(version, client)
    job = jobs().get(kind or "")
    if job is None or job.serving is None or job.serving.monitoring is None:
        raise MonitorError(f"{uri}: its job ({kind or 'unknown'}) declares no monitoring (Serving.monitoring)")
    reference = reference_profile(version, client)
    current = list(records(log, job.serving.name, str(version.version), window))
    comparison = compare(reference, current, job.serving.monitoring)
    report = save_report(comparison, Path(report_dir) / "evidently_report.html")
    metrics = {LOGGED_REQUESTS: comparison.requests, REFERENCE_REQUESTS: comparison.reference}
    if comparison.drift_share is not None:
        metrics[DRIFT_SHARE] = comparison.drift_share
    if comparison.embedding_score is not None:
        metrics[EMBEDDING_DRIFT] = comparison.embedding_score
    metrics |= {DRIFT_SCORE_PREFIX + column: score for column, score in comparison.scores.items()}
    run_id = record_check(name=version.name, version=str(version.version), check=DRIFT_CHECK,
                          window=(window.start, window.end), metrics=metrics,
                          tags={DRIFT_VERDICT: comparison.verdict}, artifact=report, client=client)  # fmt: skip
    return comparison, run_id
