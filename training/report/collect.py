"""Gather what a report needs from MLflow: the selected runs and, per section, the facts they hold.

Each `*_section` function returns None when the runs hold no data for it, so the page omits it.
Values come from MlflowClient only (params, tags, metric histories, artifacts): the report says
what MLflow recorded, nothing recomputed from checkpoints.
"""

from __future__ import annotations

import csv
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from mlflow.entities import Run
from mlflow.tracking import MlflowClient

# params that differ between any two runs without saying anything about the experiment
NOISE_PARAMS = {"run_name", "out_dir", "experiment", "registered_model", "tags", "amp_requested", "data",
                "init_from", "offline", "sync_timeout", "print_freq", "log_interval", "workers", "device"}  # fmt: skip
ENVIRONMENT_TAGS = ("torch_version", "torchvision_version", "cuda_version", "device_name", "cpu_count",
                    "python_version", "hostname")  # fmt: skip
CPU_PARAMS = ("cpu_capability", "cpu_avx512_bf16", "cpu_amx", "cpu_native_bf16", "gpu_compute_capability", "gpu_bf16")


class SelectionError(ValueError):
    """The selection matched no run; the message says what was searched."""


@dataclass
class RunFacts:
    run: Run
    kind: str  # train-resnet, train-lm, evaluate, compare, sweep-..., other
    histories: dict[str, list[tuple[int, float]]] = field(default_factory=dict)

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
        runs += _newest(client, all_experiments, f"tags.sweep_id = '{sweep}'", max_runs)
    if comparison:
        runs += _newest(client, all_experiments, f"tags.comparison_id = '{comparison}'", max_runs)
    unique = list({r.info.run_id: r for r in runs}.values())
    if not unique:
        what = ", ".join(f"{k} {v!r}" for k, v in (("run ids", run_ids), ("experiment", experiments),
                                                   ("filter", filter_string), ("sweep", sweep),
                                                   ("comparison", comparison)) if v)  # fmt: skip
        raise SelectionError(f"no runs match {what or 'nothing (give run ids, --experiment, --sweep or --comparison)'}")
    return [RunFacts(r, r.data.tags.get("job", "other")) for r in unique]


def training_runs(runs: list[RunFacts]) -> list[RunFacts]:
    return [r for r in runs if r.kind in ("train-resnet", "train-lm")]


def varying_params(runs: list[RunFacts]) -> list[str]:
    """Params whose value differs between the runs (what the comparison is about)."""
    names = sorted({name for r in runs for name in r.params} - NOISE_PARAMS)
    return [n for n in names if len({r.params.get(n) for r in runs}) > 1]


def overview_section(client: MlflowClient, runs: list[RunFacts], mlflow_url: str | None) -> dict | None:
    """One table per job kind: a row per run, the params that differ between that kind's runs."""
    trained = training_runs(runs)
    if not trained:
        return None
    groups = []
    for kind in sorted({r.kind for r in trained}, reverse=True):  # train-resnet first
        of_kind = [r for r in trained if r.kind == kind]
        varying = varying_params(of_kind)
        groups.append({"kind": kind.removeprefix("train-"), "varying": varying,
                       "rows": [_overview_row(client, r, varying, mlflow_url) for r in of_kind]})  # fmt: skip
    return {"groups": groups}


def _overview_row(client: MlflowClient, r: RunFacts, varying: list[str], mlflow_url: str | None) -> dict:
    url = f"{mlflow_url.rstrip('/')}/#/experiments/{r.run.info.experiment_id}/runs/{r.id}" if mlflow_url else None
    row = {"run": r, "name": r.name, "kind": r.kind.removeprefix("train-"), "url": url,
           "params": [r.params.get(p, "") for p in varying], "epochs": len(r.history(client, "val/loss")),
           "seconds": r.metrics.get("time/total_seconds"), "device": r.tags.get("device_name", "")}  # fmt: skip
    if r.kind == "train-resnet":
        acc5 = r.history(client, "val/acc5")
        rate = r.history(client, "time/images_per_second")
        row.update(best_acc1=r.metrics.get("best/val_acc1"), best_acc5=max((v for _, v in acc5), default=None),
                   rate=sum(v for _, v in rate) / len(rate) if rate else None, rate_unit="images/s")  # fmt: skip
    else:
        ppl = r.history(client, "val/ppl")
        rate = r.history(client, "time/tokens_per_second")
        row.update(best_ppl=min((v for _, v in ppl), default=None), test_ppl=r.metrics.get("test/ppl"),
                   rate=sum(v for _, v in rate) / len(rate) if rate else None, rate_unit="tokens/s")  # fmt: skip
    return row


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
        train_key = "train/loss" if r.kind == "train-resnet" else "train/epoch_loss"
        quality = "val/acc1" if r.kind == "train-resnet" else "val/ppl"
        train, val = r.history(client, train_key), r.history(client, "val/loss")
        best = r.metrics.get("best/epoch")
        series.append({"name": r.name, "kind": r.kind, "train_loss": train, "val_loss": val,
                       "quality_key": quality, "quality": r.history(client, quality),
                       "best_epoch": int(best) if best is not None else None,
                       "overfit_epoch": overfitting_epoch(train, val)})  # fmt: skip
    return {"series": series}


def bench_section(client: MlflowClient, runs: list[RunFacts]) -> dict | None:
    benched = [r for r in runs if "comparison_id" in r.tags and "bench_config" in r.tags]
    if not benched:
        return None
    rows = []
    for r in benched:
        rate = r.history(client, "time/images_per_second")
        wait = r.history(client, "time/data_wait_share")
        acc = r.history(client, "val/acc1")
        rows.append({"configuration": r.tags["bench_config"], "processes": r.params.get("world_size", "1"),
                     "workers": r.params.get("workers", ""), "epochs": len(acc),
                     "seconds": r.metrics.get("time/total_seconds"),
                     "images_per_s": sum(v for _, v in rate) / len(rate) if rate else None,
                     "data_wait": sum(v for _, v in wait) / len(wait) if wait else None,
                     "val_acc1": acc[-1][1] if acc else None})  # fmt: skip
    return {"comparisons": sorted({r.tags["comparison_id"] for r in benched}), "rows": rows}


def _download_text(client: MlflowClient, run_id: str, path: str) -> str | None:
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one small file: no bar
    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = client.download_artifacts(run_id, path, tmp)
        except Exception:  # the artifact is not there
            return None
        return Path(local).read_text(encoding="utf-8", errors="replace")


def model_key(r: RunFacts) -> str:
    p = r.params
    if r.kind == "train-resnet":
        return f"{p.get('arch')} ({p.get('stem')} stem, {p.get('image_size', '64')}px)"
    return f"{p.get('model')} {p.get('nlayers')}x{p.get('nhid')} (emsize {p.get('emsize')})"


def layers_section(client: MlflowClient, runs: list[RunFacts]) -> dict | None:
    tables = {}
    for r in training_runs(runs):
        key = model_key(r)
        if key not in tables:
            text = _download_text(client, r.id, "model_summary.txt")
            if text:
                tables[key] = text
    return {"tables": tables} if tables else None


def evaluation_section(client: MlflowClient, runs: list[RunFacts], thumbnails: int = 8) -> dict | None:
    evaluations = [{"name": r.name, "source": r.tags.get("source_run_id"), "split": r.params.get("split"),
                    "images": r.params.get("images"), "acc1": r.metrics.get("eval/acc1"),
                    "acc5": r.metrics.get("eval/acc5")} for r in runs if r.kind == "evaluate"]  # fmt: skip
    comparisons = []
    for r in (r for r in runs if r.kind == "compare"):
        rows = []
        text = _download_text(client, r.id, "disagreements.csv")
        if text:
            rows = list(csv.DictReader(text.splitlines()))[:thumbnails]
        comparisons.append({"name": r.name, "run_a": r.tags.get("source_run_a"), "run_b": r.tags.get("source_run_b"),
                            "a_acc1": r.metrics.get("a/acc1"), "b_acc1": r.metrics.get("b/acc1"),
                            "a_acc5": r.metrics.get("a/acc5"), "b_acc5": r.metrics.get("b/acc5"),
                            "agreement": r.metrics.get("agreement"), "disagreements": r.metrics.get("disagreements"),
                            "images": r.params.get("images"), "first": rows})  # fmt: skip
    if not evaluations and not comparisons:
        return None
    return {"evaluations": evaluations, "comparisons": comparisons}


def language_section(client: MlflowClient, runs: list[RunFacts]) -> dict | None:
    lms = [r for r in runs if r.kind == "train-lm"]
    if not lms:
        return None
    epochs = sorted({step for r in lms for step, _ in r.history(client, "val/ppl")})
    table = [[dict(r.history(client, "val/ppl")).get(e) for r in lms] for e in epochs]
    samples = {}
    for r in lms:
        generated = sorted(a.path for a in client.list_artifacts(r.id, "generated") if not a.is_dir)
        if generated:
            samples[r.name] = {"file": generated[-1], "text": _download_text(client, r.id, generated[-1])}
    return {"runs": [r.name for r in lms], "epochs": epochs, "ppl": table,
            "test_ppl": [r.metrics.get("test/ppl") for r in lms], "samples": samples}  # fmt: skip


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
