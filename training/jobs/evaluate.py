"""`dlops evaluate`'s options, and the MLflow run every evaluation is logged as (under the run that
trained the checkpoint, tagged as an evaluation of it)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from training import tracking
from training.tracking.tags import EVALUATE, JOB_TAG, SOURCE_RUN_TAG


@dataclass(frozen=True, kw_only=True)
class EvaluateOptions:
    """`dlops evaluate`'s options; a job uses those that apply to it."""

    split: str = "val"
    batch_size: int = 256
    workers: int = 0
    device: str = "auto"
    amp: str = "off"
    limit: int | None = None
    print_freq: int = 10


@contextmanager
def evaluation_run(state: dict[str, Any], *, source: str, data: Path, split: str, device_name: str,
                   experiment: str) -> Iterator[tracking.DirectRun]:  # fmt: skip
    """The MLflow run of one evaluation of checkpoint `state` (named `source`) on DATA's `split`: in the
    checkpoint's experiment (else `experiment`), a child of the training run."""
    source_run = state.get("run_id")
    tags = {JOB_TAG: EVALUATE, SOURCE_RUN_TAG: str(source_run), "device_name": device_name}
    if source_run:
        tags[MLFLOW_PARENT_RUN_ID] = source_run  # shows the evaluation under its training run
    with tracking.start_run(state.get("experiment") or experiment, run_name=f"evaluate-{split}", tags=tags) as run:
        run.log_params({"checkpoint": source, "data": str(Path(data).resolve()), "split": split})
        yield run
