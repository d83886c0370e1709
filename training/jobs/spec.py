"""What a kind of job declares once: its name, options, metrics, report, serving and commands.

    SPEC = JobSpec(kind="tabular", config=TabularConfig, run=TabularRun, build_model=mlp.build_mlp,
                   data_hint="a folder with train.csv and val.csv", metrics=(ACCURACY,), best=ACCURACY,
                   serving=Serving(...), commands=(synth_command,))

A JobSpec is the `dlops.jobs` entry point (training/jobs/__init__.py finds it). It holds what every
command reads about a kind without running it: `dlops train` builds its options from `config`,
reports read `metrics` and `report`, sweeps optimize `sweep` (default: `best`), packaging and
deploys read `serving`, `dlops evaluate` calls `evaluate`. What one run builds and does is its
`run` class (training/jobs/run.py); what serving needs beyond files is the Serving adapter
(training/jobs/serving.py). Everything optional has a default that works everywhere: a job
without serving trains, reports, sweeps and registers its checkpoint; packaging says why not.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from torch import nn

from training.jobs.config import DistributedConfig, RunConfig
from training.metrics import TRAIN_LOSS, VAL_LOSS, Metric

if TYPE_CHECKING:
    from training.jobs.evaluate import EvaluateOptions
    from training.jobs.run import JobRun
    from training.jobs.serving import Serving


@dataclass(frozen=True, kw_only=True)
class Machine:
    """What `dlops doctor` hands a job's own checks: the machine's facts and the probe's time budget."""

    cpu: Any  # training.hardware.CpuFacts
    gpu: dict[str, Any]  # the doctor's GPU section ({"cuda": bool, "devices": [...]})
    probe_budget_s: float


@dataclass(frozen=True, kw_only=True)
class Column:
    """A column of a report's run table: one number per run, from a metric's history."""

    label: str
    metric: str
    summary: str = "last"  # last (the run's latest value), max, min or mean over its epochs
    digits: int = 2
    unit: str = ""


@dataclass(frozen=True, kw_only=True)
class EpochTable:
    """A report table of one metric per epoch, a column per run, and a final row (e.g. test ppl),
    followed by each run's newest file under `samples` (an artifact folder) when it has one."""

    title: str
    metric: Metric
    final: Column | None = None
    samples: str | None = None


@dataclass(frozen=True, kw_only=True)
class ReportSection:
    """A section a job adds to `dlops report` about runs only it makes (a device benchmark, comparisons).

    `collect(client, runs)` gets an MlflowClient and the report's runs (each with .id, .name, .kind,
    .tags, .params, .metrics and .history(client, metric)) and returns the data its templates show,
    or None when no run is of its kind; Picture objects under "pictures" are embedded. `templates`
    is the folder of `<name>.html.j2` and `<name>.md.j2`, which see that data as `data`.
    """

    name: str
    collect: Callable[[Any, list[Any]], dict[str, Any] | None]
    templates: Path


@dataclass(frozen=True, kw_only=True)
class ReportSpec:
    """How `dlops report` shows the job's runs."""

    columns: tuple[Column, ...]  # the run table's quality columns
    quality: Metric  # the second learning-curve panel
    train_loss: str = TRAIN_LOSS  # the training loss curve (dashed) beside val loss
    throughput: Column | None = None
    epoch_table: EpochTable | None = None
    sections: tuple[ReportSection, ...] = ()  # sections of the job's own, after the shared ones


def _merge(defaults: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
    return {**defaults, **given}


@dataclass(frozen=True, kw_only=True, eq=False)  # one object per kind: compared and hashed as itself
class JobSpec:
    kind: str  # `dlops train KIND`; the entry point's name
    description: str  # what the job trains, in one sentence (`dlops train --help`)
    config: type[RunConfig]  # the run's options (a RunConfig subclass)
    run: type[JobRun]  # what one run builds and does
    build_model: Callable[..., nn.Module]  # model_config (keywords) -> the model: runs, serving, evaluation
    data_hint: str  # what DATA is, for the error when it is missing
    metrics: tuple[Metric, ...]  # what it logs per epoch that a user may pick (sweeps, reports)
    best: Metric  # picks the best epoch (best.pt, the registered version, promote --if-better)
    sweep: Metric | None = None  # what a sweep optimizes, reported every epoch (default: best)
    early_stop: Metric = VAL_LOSS  # what --early-stop-patience watches (the run's evaluate returns it)
    report: ReportSpec | None = None  # default: a column of the best value, and its curve
    panels: dict[str, list[str]] | None = None  # the run's learning curves, title -> metrics (default: losses, best)
    serving: Serving | None = None  # None: nothing to package or serve (training, reports and sweeps work)
    commands: tuple[click.Command, ...] = ()  # the job's own commands beside `dlops train KIND`
    data_commands: tuple[click.Command, ...] = ()  # its data commands, under `dlops data`
    describe_model: Callable[[dict[str, str]], str] = lambda params: ""  # a run's model in a few words
    data_required: Callable[[dict[str, Any]], bool] = lambda given: True  # DATA must be given (unless --dummy...)
    resolve_options: Callable[[dict[str, Any], dict[str, Any]], dict[str, Any]] = _merge  # presets between
    evaluate: Callable[[JobSpec, dict[str, Any], str, Path, EvaluateOptions], None] | None = None  # default: generic
    upgrade_v1: Callable[[dict[str, Any]], tuple[dict, float, dict, dict]] | None = None  # format-1 checkpoints
    doctor: Callable[[Machine], dict[str, Any]] | None = None  # its part of `dlops doctor` (with "lines")
    summary_graph: bool = False  # also trace the model into TensorBoard
    step_metrics: tuple[str, ...] = ()  # metrics logged per global step inside an epoch
    distributed: bool = False  # DDP through torchrun, on one or several machines: its config is a DistributedConfig

    def __post_init__(self) -> None:
        """Fill in what was not declared (the report, the learning curves); then check that what a job
        names, it declares: a misspelt metric fails when the spec is made, not mid-run."""
        if self.report is None:  # one column of the best value, and its curve
            column = Column(label=f"best {self.best.label}", metric=self.best.name,
                            summary="max" if self.best.higher_is_better else "min")  # fmt: skip
            object.__setattr__(self, "report", ReportSpec(columns=(column,), quality=self.best))
        if self.panels is None:  # losses, and the best metric
            panels = {"loss": [self.report.train_loss, VAL_LOSS.name], self.best.label: [self.best.name]}
            object.__setattr__(self, "panels", panels)
        declared = {m.name for m in self.metrics} | {self.early_stop.name}
        named = [self.best.name, self.sweep_metric.name, self.report.quality.name]
        if self.report.epoch_table:
            named.append(self.report.epoch_table.metric.name)
        if set(named) - declared:
            raise TypeError(f"job {self.kind!r} names metrics it does not declare: {sorted(set(named) - declared)}")
        if not (isinstance(self.config, type) and issubclass(self.config, RunConfig)):
            raise TypeError(f"job {self.kind!r}: config must be a RunConfig subclass, got {self.config!r}")
        if self.distributed and not issubclass(self.config, DistributedConfig):
            raise TypeError(f"job {self.kind!r} is distributed: its config must be a DistributedConfig subclass "
                            "(processes and nodes)")  # fmt: skip

    @property
    def sweep_metric(self) -> Metric:
        return self.sweep or self.best

    def with_changes(self, **changes: Any) -> JobSpec:
        """This spec with some declarations replaced (tests, and jobs built on another)."""
        return dataclasses.replace(self, **changes)


__all__ = ["TRAIN_LOSS", "VAL_LOSS", "Column", "EpochTable", "JobSpec", "Metric", "ReportSection", "ReportSpec"]
