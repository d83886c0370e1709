"""The training jobs, found as plug-ins, and the one way to turn typed options into a job's config.

A job is a JobSpec (training/jobs/spec.py: what a kind declares once), naming its JobRun class
(run.py: what one run builds and does) and, when it serves, a Serving adapter (serving.py). Jobs
come from the `dlops.jobs` entry-point group, as pytest and MLflow find their plug-ins: the
built-in ones are registered in this project's pyproject.toml, and a package installed beside it
registers its own the same way:

    [project.entry-points."dlops.jobs"]
    tabular = "dlops_tabular.job:SPEC"      # name = the job's kind

A job that fails to load (its import raises, or it is not a JobSpec of that kind) is reported by
name with the error, and every other job still works.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from training.checkpoint import V1_CONVERSIONS, CheckpointError, config_for_resume, load_checkpoint
from training.jobs.config import RunConfig
from training.jobs.run import JobRun, Optimization
from training.jobs.serving import Monitoring, Quality, Serving
from training.jobs.spec import JobSpec
from training.metrics import Metric
from training.options import resumable_fields

ENTRY_POINT_GROUP = "dlops.jobs"

__all__ = ["JobRun", "JobSpec", "Metric", "Monitoring", "Optimization", "Quality", "RunConfig", "Serving",
           "broken_jobs", "job_for", "job_serving", "jobs", "make_config"]  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class BrokenJob:
    kind: str
    target: str  # module:object, as the entry point names it
    error: str

    def describe(self) -> str:
        return f"the job plug-in {self.kind!r} ({self.target}) failed to load: {self.error}"


@functools.cache
def _discover() -> tuple[dict[str, JobSpec], dict[str, BrokenJob]]:
    found: dict[str, JobSpec] = {}
    broken: dict[str, BrokenJob] = {}
    for entry in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if entry.name in found or entry.name in broken:  # the same distribution seen twice on sys.path
            continue
        try:
            job = entry.load()
            if not isinstance(job, JobSpec):
                raise TypeError(f"{entry.value} is not a training.jobs.JobSpec")
            if job.kind != entry.name:
                raise TypeError(f"{entry.value} declares kind {job.kind!r}, its entry point is named {entry.name!r}")
        except Exception as e:  # noqa: BLE001 - any failure of a plug-in is reported, never fatal to the others
            broken[entry.name] = BrokenJob(kind=entry.name, target=entry.value, error=f"{type(e).__name__}: {e}")
            continue
        found[entry.name] = job
        if job.upgrade_v1 is not None:  # checkpoints of format 1 of this kind load through it
            V1_CONVERSIONS[job.kind] = job.upgrade_v1
    return found, broken


def jobs() -> dict[str, JobSpec]:
    """Every job that loaded, by kind."""
    return dict(_discover()[0])


def broken_jobs() -> list[BrokenJob]:
    return list(_discover()[1].values())


def job_for(kind: str) -> JobSpec:
    found, broken = _discover()
    if kind in found:
        return found[kind]
    if kind in broken:
        raise CheckpointError(broken[kind].describe())
    known = ", ".join(found) or f"none: is dlops installed (its {ENTRY_POINT_GROUP} entry points)?"
    raise CheckpointError(f"unknown job kind {kind!r}; the installed jobs are {known}")


def job_serving(model: str) -> JobSpec | None:
    """The job whose served model is named `model` (/predictions/<model>), if one is installed."""
    return next((job for job in jobs().values() if job.serving and job.serving.name == model), None)


def make_config(job: JobSpec, given: dict[str, Any], resume: Path | None = None) -> RunConfig:
    """A validated config from the options a user gave (everything else from the defaults).

    New run: the job's defaults, then its preset (the ResNet's --recipe, per device class), then
    `given`. Resumed run: the interrupted run's options, with `given` applied where changing them
    is safe (checkpoint.config_for_resume).
    """
    config_class = job.config
    if resume is not None:
        saved = load_checkpoint(resume, kind=job.kind)["config"]
        known = {f.name for f in dataclasses.fields(config_class)}
        options = config_for_resume(saved, given, resumable_fields(config_class) | {"data"})
        return config_class(**{k: v for k, v in options.items() if k in known})
    defaults = {f.name: f.default for f in dataclasses.fields(config_class) if f.default is not dataclasses.MISSING}
    return config_class(**job.resolve_options(defaults, given))
