"""The training jobs, by kind, and the one way to turn typed options into a job's config."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from training.checkpoint import CheckpointError, config_for_resume, load_checkpoint
from training.jobs.base import Job, RunConfig
from training.jobs.lm import LMConfig, LMJob
from training.jobs.resnet import ResNetConfig, ResNetJob
from training.options import resumable_fields

JOBS: dict[str, type[Job]] = {job.kind: job for job in (ResNetJob, LMJob)}

__all__ = ["JOBS", "Job", "LMConfig", "ResNetConfig", "RunConfig", "job_for", "make_config"]


def job_for(kind: str) -> type[Job]:
    if kind not in JOBS:
        raise CheckpointError(f"unknown job kind {kind!r}; this dlops knows {', '.join(JOBS)}")
    return JOBS[kind]


def make_config(job_class: type[Job], given: dict[str, Any], resume: Path | None = None) -> RunConfig:
    """A validated config from the options a user gave (everything else from the defaults).

    New run: the job's defaults, then its recipe (the ResNet's --recipe, per device class), then
    `given`. Resumed run: the interrupted run's options, with `given` applied where changing them
    is safe (checkpoint.config_for_resume).
    """
    config_class = job_class.config_class
    if resume is not None:
        saved = load_checkpoint(resume, kind=job_class.kind)["config"]
        known = {f.name for f in dataclasses.fields(config_class)}
        options = config_for_resume(saved, given, resumable_fields(config_class) | {"data"})
        return config_class(**{k: v for k, v in options.items() if k in known})
    defaults = {f.name: f.default for f in dataclasses.fields(config_class) if f.default is not dataclasses.MISSING}
    return config_class(**job_class.resolve_options(defaults, given))
