"""Live quality from feedback: true answers, given later by request id, joined to the logged answers.

    dlops feedback truth.csv --model resnet-tinyimagenet

The file is CSV with a header (columns `request_id` and `truth`) or JSON lines ({"request_id": ...,
"truth": ...}); a request id is the X-Dlops-Request-Id of the answer. Only requests the prediction
log sampled can be joined: the others are counted as unmatched. Per version, the share of joined
answers whose declared field (the job's Quality: the predicted class) equals the truth is logged
as an MLflow run beside the figure the version was registered with.
"""

from __future__ import annotations

import csv
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from monitoring import MonitorError
from monitoring.predictions import by_id
from monitoring.runs import (
    FEEDBACK_CHECK,
    FEEDBACK_MATCHED,
    FEEDBACK_UNMATCHED,
    LIVE_PREFIX,
    REGISTERED_PREFIX,
    record_check,
)

ID, TRUTH = "request_id", "truth"


@dataclass(frozen=True, kw_only=True)
class LiveQuality:
    version: str
    name: str  # the quality's name (accuracy)
    matched: int
    correct: int
    registered: float | None  # the validation figure the version was registered with, same unit (0..1)
    window: tuple[float, float]
    run_id: str | None = None

    @property
    def live(self) -> float:
        return self.correct / self.matched


def read_feedback(path: Path) -> list[tuple[str, str]]:
    """(request id, truth) pairs from a CSV or JSON-lines file; errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise MonitorError(f"{path}: no such feedback file")
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("{"):
        pairs = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
                pairs.append((str(item[ID]), str(item[TRUTH])))
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise MonitorError(f"{path}, line {number}: expected {{{ID!r}: ..., {TRUTH!r}: ...}} ({e})") from e
        return pairs
    reader = csv.DictReader(text.splitlines())
    if not reader.fieldnames or not {ID, TRUTH} <= set(reader.fieldnames):
        raise MonitorError(f"{path}: a CSV header with the columns {ID} and {TRUTH} is needed, got {reader.fieldnames}")
    return [(row[ID], row[TRUTH]) for row in reader]


def live_quality(path: Path, *, model: str, log: Path) -> list[LiveQuality]:
    """Join the feedback in `path` to the prediction log of registered model `model`; log one run per version."""
    from training.jobs import jobs
    from training.tracking import registry, store_client

    client = store_client()
    newest = registry.resolve(f"models:/{model}/latest", client)
    job = jobs().get(registry.job_kind(newest, client) or "")
    quality = job.serving.monitoring.quality if job and job.serving and job.serving.monitoring else None
    if quality is None:
        raise MonitorError(f"{model}: its job declares no quality to measure from feedback (Monitoring.quality)")
    logged, feedback = by_id(log, job.serving.name), read_feedback(path)
    joined: dict[str, list[tuple[dict, str]]] = {}
    for request_id, truth in feedback:
        if request_id in logged:
            joined.setdefault(logged[request_id]["version"], []).append((logged[request_id], truth))
    if not joined:
        raise MonitorError(f"{path}: none of its {len(feedback)} request ids is in the prediction log {log} "
                           f"(only sampled requests are logged: dlops serve --log-sample)")  # fmt: skip
    unmatched = sum(1 for request_id, _ in feedback if request_id not in logged)
    results = []
    for served_version, pairs in sorted(joined.items()):
        registered = None
        if quality.registered_metric:
            found = client.get_model_version(model, served_version)
            registered = registry.version_metric(found, quality.registered_metric, client) * quality.registered_scale
        times = [record["time"] for record, _ in pairs]
        correct = sum(1 for record, truth in pairs if answered(record, quality.answer_field) == truth)
        result = LiveQuality(version=served_version, name=quality.name, matched=len(pairs), correct=correct,
                             registered=registered, window=(min(times), max(times)))  # fmt: skip
        metrics = {
            FEEDBACK_MATCHED: result.matched,
            FEEDBACK_UNMATCHED: unmatched,
            LIVE_PREFIX + quality.name: result.live,
        }
        if registered is not None:
            metrics[REGISTERED_PREFIX + quality.name] = registered
        run_id = record_check(name=model, version=served_version, check=FEEDBACK_CHECK, window=result.window,
                              metrics=metrics, client=client)  # fmt: skip
        results.append(dataclasses.replace(result, run_id=run_id))
    return results


def answered(record: dict, field: str) -> str:
    """The logged answer's `field`, as text (the truth is text too)."""
    return str((record.get("answer") or {}).get(field))
