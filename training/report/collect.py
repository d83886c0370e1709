"""Gather what a report needs from MLflow: the selected runs and, per section, the facts they hold.

Each `*_section` function returns None when the runs hold no data for it, so the page omits it.
Values come from MlflowClient only (params, tags, metric histories, artifacts): the report says
what MLflow recorded, nothing recomputed from checkpoints.
"""

from __future__ import annotations

import datetime
import json
import math
from dataclasses import dataclass, field

from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from release import history
from training.jobs import JobSpec, jobs
from training.jobs.spec import Column
from training.metrics import BEST_EPOCH, EVAL_PREFIX, TOTAL_SECONDS, VAL_LOSS, eval_metric_name
from training.tracking.artifacts import MODEL_SUMMARY
from training.tracking.store import download_text
from training.tracking.tags import (
    COMPARISON_ID,
    DEPLOYMENT,
    EVALUATE,
    JOB_TAG,
    OUTCOME,
    REASON,
    SOURCE_RUN_TAG,
    SWEEP_ID,
    trained_kind,
)

# params that differ between any two runs without saying anything about the experiment
NOISE_PARAMS = {"run_name", "out_dir", "experiment", "registered_model", "tags", "amp_requested", "data",
                "init_from", "offline", "sync_timeout", "print_freq", "log_interval", "workers", "device"}  # fmt: skip
ENVIRONMENT_TAGS = ("torch_version", "torchvision_version", "cuda_version", "device_name", "cpu_count",
                    "python_version", "hostname")  # fmt: skip
CPU_PARAMS = ("cpu_capability", "cpu_avx512_bf16", "cpu_amx", "cpu_native_bf16", "gpu_compute_capability", "gpu_bf16")


class SelectionError(ValueError):
    """The selection matched no run; the message says what was searched."""


@dataclass(kw_only=True)
class RunFacts:
    run: Run
    kind: str  # the job tag: train-<kind>, evaluate, compare, sweep-<kind>, other
    histories: dict[str, list[tuple[int, float]]] = field(default_factory=dict)

    @property
    def job(self) -> JobSpec | None:
        """The installed job that trained this run; None for other runs (and jobs not installed here)."""
        return jobs().get(trained_kind(self.run.data.tags) or "")

    @property
    def id(self) -> str:
        return self.run.info.run_id

    @property
    def name(self) -> str:
        return self.run.info.run_name or self.id[:8]

    @property
    def params(self) -> dict[str, str]:
        return self.run.data.params

    @property
    def tags(self) -> dict[str, str]:
        return self.run.data.tags

    @property
    def metrics(self) -> dict[str, float]:
        return self.run.data.metrics

    def history(self, client: MlflowClient, key: str) -> list[tuple[int, float]]:
        if key not in self.histories:
            points = {m.step: m.value for m in client.get_metric_history(self.id, key)}
            self.histories[key] = sorted(points.items())
        return self.histories[key]


def _newest(client: MlflowClient, experiment_ids: list[str], filter_string: str, max_runs: int) -> list[Run]:
    """The newest `max_runs` matching runs, oldest first."""
    runs = client.search_runs(experiment_ids, filter_string, max_results=max_runs,
                              order_by=["attributes.start_time DESC"])  # fmt: skip
    return runs[::-1]


def select_runs(client: MlflowClient, *, run_ids: tuple[str, ...] = (), experiments: tuple[str, ...] = (),
                filter_string: str = "", max_runs: int = 50, sweep: str | None = None,
                comparison: str | None = None) -> list[RunFacts]:  # fmt: skip
    """The runs a report is about: by id, by experiment (and MLflow filter, newest `max_runs` of
    each), or by sweep / device-bench id."""
    runs: list[Run] = [client.get_run(run_id) for run_id in run_ids]
    for name in experiments:
        found = client.get_experiment_by_name(name)
        if found is None:
            raise SelectionError(f"--experiment {name!r}: no such experiment in {client.tracking_uri}")
        runs += _newest(client, [found.experiment_id], filter_string, max_runs)
    all_experiments = [e.experiment_id for e in client.search_experiments()]
    if sweep:
        runs += _newest(client, all_experiments, f"tags.{SWEEP_ID} = '{sweep}'", max_runs)
    if comparison:
        runs += _newest(client, all_experiments, f"tags.{COMPARISON_ID} = '{comparison}'", max_runs)
    unique = list({r.info.run_id: r for r in runs}.values())
    if not unique:
        what = ", ".join(f"{k} {v!r}" for k, v in (("run ids", run_ids), ("experiment", experiments),
                                                   ("filter", filter_string), ("sweep", sweep),
                                                   ("comparison", comparison)) if v)  # fmt: skip
        raise SelectionError(f"no runs match {what or 'nothing (give run ids, --experiment, --sweep or --comparison)'}")
    return [RunFacts(run=r, kind=r.data.tags.get(JOB_TAG, "other")) for r in unique]


def training_runs(runs: list[RunFacts]) -> list[RunFacts]:
    """The training runs of installed jobs, grouped by job in the order the jobs are installed."""
    order = list(jobs())
    trained = [r for r in runs if r.job is not None]
    return sorted(trained, key=lambda r: order.index(r.job.kind))


def varying_params(runs: list[RunFacts]) -> list[str]:
    """Params whose value differs between the runs (what the comparison is about)."""
    names = sorted({name for r in runs for name in r.params} - NOISE_PARAMS)
    return [n for n in names if len({r.params.get(n) for r in runs}) > 1]


def overview_section(client: MlflowClient, runs: list[RunFacts], mlflow_url: str | None) -> dict | None:
    """One table per job: a row per run, the params that differ between that job's runs, its columns."""
    trained = training_runs(runs)
    if not trained:
        return None
    groups = []
    for job in dict.fromkeys(r.job for r in trained):
        of_kind = [r for r in trained if r.job is job]
        varying = varying_params(of_kind)
        groups.append({"kind": job.kind, "varying": varying, "columns": job.report.columns,
                       "rows": [_overview_row(client, r, varying, mlflow_url) for r in of_kind]})  # fmt: skip
    return {"groups": groups}


def summarize(client: MlflowClient, r: RunFacts, column: Column) -> float | None:
    """A run's number for a report column: its latest value, or the max, min or mean over its epochs."""
    if column.summary == "last":
        return r.metrics.get(column.metric)
    values = [v for _, v in r.history(client, column.metric)]
    if not values:
        return None
    return {"max": max, "min": min, "mean": lambda v: sum(v) / len(v)}[column.summary](values)


def _overview_row(client: MlflowClient, r: RunFacts, varying: list[str], mlflow_url: str | None) -> dict:
    url = f"{mlflow_url.rstrip('/')}/#/experiments/{r.run.info.experiment_id}/runs/{r.id}" if mlflow_url else None
    report = r.job.report
    return {"run": r, "name": r.name, "kind": r.job.kind, "url": url, "params": [r.params.get(p, "") for p in varying],
            "values": [summarize(client, r, c) for c in report.columns],
            "epochs": len(r.history(client, r.job.early_stop.name)), "seconds": r.metrics.get(TOTAL_SECONDS),
            "rate": summarize(client, r, report.throughput) if report.throughput else None,
            "rate_unit": report.throughput.unit if report.throughput else "",
            "device": r.tags.get("device_name", "")}  # fmt: skip


def overfitting_epoch(train: list[tuple[int, float]], val: list[tuple[int, float]]) -> int | None:
    """The first epoch after the validation-loss minimum where val loss is above that minimum while
    training loss is below its value there: where overfitting shows. None if it never does."""
    if len(val) < 2:
        return None
    best_epoch, best_val = min(val, key=lambda p: p[1])
    train_at = dict(train)
    if best_epoch not in train_at:
        return None
    for epoch, value in val:
        if epoch > best_epoch and value > best_val and train_at.get(epoch, float("inf")) < train_at[best_epoch]:
            return epoch
    return None


def curves_section(client: MlflowClient, runs: list[RunFacts]) -> dict | None:
    trained = training_runs(runs)
    if not trained:
        return None
    series = []
    for r in trained:
        report = r.job.report
        train, val = r.history(client, report.train_loss), r.history(client, r.job.early_stop.name)
        best = r.metrics.get(BEST_EPOCH)
        series.append({"name": r.name, "kind": r.job.kind, "train_loss": train, "val_loss": val,
                       "quality_key": report.quality.name, "quality": r.history(client, report.quality.name),
                       "best_epoch": int(best) if best is not None else None,
                       "overfit_epoch": overfitting_epoch(train, val)})  # fmt: skip
    return {"series": series, "jobs": list(dict.fromkeys(r.job for r in trained))}


def layers_section(client: MlflowClient, runs: list[RunFacts]) -> dict | None:
    """Each model's layer table once (runs of the same model share it), named as its job describes it."""
    tables = {}
    for r in training_runs(runs):
        key = r.job.describe_model(r.params) or r.job.kind
        if key not in tables:
            text = download_text(client, r.id, MODEL_SUMMARY)
            if text:
                tables[key] = text
    return {"tables": tables} if tables else None


def evaluation_section(client: MlflowClient, runs: list[RunFacts]) -> dict | None:
    """Every `dlops evaluate` run: its split, size and eval/ metrics."""
    evaluated = [r for r in runs if r.kind == EVALUATE]
    if not evaluated:
        return None
    loss = eval_metric_name(VAL_LOSS.name)
    metrics = sorted({m for r in evaluated for m in r.metrics if m.startswith(EVAL_PREFIX) and m != loss})
    evaluations = [{"name": r.name, "source": r.tags.get(SOURCE_RUN_TAG), "split": r.params.get("split"),
                    "size": r.params.get("images") or r.params.get("tokens") or r.params.get("rows"),
                    "values": [r.metrics.get(m) for m in metrics]} for r in evaluated]  # fmt: skip
    return {"evaluations": evaluations, "metrics": [m.removeprefix(EVAL_PREFIX) for m in metrics]}


def epoch_tables_section(client: MlflowClient, runs: list[RunFacts]) -> dict | None:
    """Per job that declares one (its report's epoch_table): a metric per epoch, a column per run, a
    final row, and each run's newest sample file (generated text)."""
    tables = []
    trained = training_runs(runs)
    for job in dict.fromkeys(r.job for r in trained):
        spec = job.report.epoch_table
        if spec is None:
            continue
        of_kind = [r for r in trained if r.job is job]
        epochs = sorted({step for r in of_kind for step, _ in r.history(client, spec.metric.name)})
        values = [[dict(r.history(client, spec.metric.name)).get(e) for r in of_kind] for e in epochs]
        final = [summarize(client, r, spec.final) for r in of_kind] if spec.final else None
        samples = {}
        for r in of_kind if spec.samples else ():
            files = sorted(a.path for a in client.list_artifacts(r.id, spec.samples) if not a.is_dir)
            if files:
                samples[r.name] = {"file": files[-1], "text": download_text(client, r.id, files[-1])}
        tables.append({"kind": job.kind, "title": spec.title, "header": spec.metric.name.replace("/", " "),
                       "final_label": spec.final.label if spec.final else "",
                       "runs": [r.name for r in of_kind], "epochs": epochs, "values": values, "final": final,
                       "samples": samples})  # fmt: skip
    return {"tables": tables} if tables else None


def environment_section(runs: list[RunFacts]) -> dict | None:
    rows = []
    for r in training_runs(runs) or runs:
        values = {t: r.tags.get(t) for t in ENVIRONMENT_TAGS} | {p: r.params.get(p) for p in CPU_PARAMS}
        values = {k: v for k, v in values.items() if v is not None}
        if values:
            rows.append({"name": r.name, "values": values})
    if not rows:
        return None
    keys = [k for k in (*ENVIRONMENT_TAGS, *CPU_PARAMS) if any(k in row["values"] for row in rows)]
    distinct = {json.dumps(row["values"], sort_keys=True) for row in rows}
    return {"columns": keys, "rows": rows, "same_everywhere": len(distinct) == 1}


def _last_canary_step(metrics: dict[str, float]) -> str:
    """The last value of each step metric: the last step a canary reached ("–" for a plain deploy)."""
    if history.WEIGHT not in metrics:
        return "–"
    canary_p99, stable_p99 = (metrics.get(m, math.nan) for m in (history.CANARY_P99_MS, history.STABLE_P99_MS))
    return (f"{metrics[history.WEIGHT]:g}%: canary p99 {canary_p99:.0f} ms, errors "
            f"{metrics.get(history.CANARY_ERROR_RATE, 0):.1%}; stable p99 {stable_p99:.0f} ms")  # fmt: skip


def deployments_section(runs: list[RunFacts]) -> dict | None:
    """The deploys among the runs (`dlops report --experiment deployments`), oldest first: what went where, how
    it ended and why, and the canary's last step."""
    deploys = sorted((r for r in runs if r.kind == DEPLOYMENT), key=lambda r: r.run.info.start_time)
    if not deploys:
        return None
    rows = []
    for r in deploys:
        started = datetime.datetime.fromtimestamp(r.run.info.start_time / 1000)
        rows.append({"when": started.strftime("%Y-%m-%d %H:%M"), "model": r.params.get(history.SERVED_MODEL, ""),
                     "event": r.params.get(history.DEPLOY_EVENT, ""), "from": r.params.get(history.FROM_VERSION) or "–",
                     "to": r.params.get(history.TO_VERSION, ""), "registered": r.params.get(history.REGISTERED_VERSION),
                     "last_step": _last_canary_step(r.metrics), "outcome": r.tags.get(OUTCOME, "(under way)"),
                     "reason": r.tags.get(REASON, "")})  # fmt: skip
    return {"rows": rows}
