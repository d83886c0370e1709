"""The tracking journal's records, one dataclass per kind: the only way a record is written (the run's
tracker) or read (the sender, `dlops sync`, the run's own memory of its metrics).

On disk each is one JSON line, {"op": KIND, "time": MS, **fields}, as journals of earlier releases
wrote them:

    create_run   an offline run's server-side run, made at delivery (found again by its local id)
    status       the run's status (RUNNING again on a resume)
    params, tags a batch of either
    metrics      values at a step (system metrics marked: they count steps of their own)
    artifact     a file of the run folder; artifact_dir: a folder (TensorBoard's)
    text         a text artifact spooled at call time (journal/spool/<name>)
    register     a logged file as a model version; log_model: an MLflow model as a LoggedModel and version
    end          the run's end and final status
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar


@dataclass(frozen=True, kw_only=True)
class Record:
    op: ClassVar[str]
    time: int = 0  # milliseconds since the epoch, set when the journal appends it


@dataclass(frozen=True, kw_only=True)
class CreateRun(Record):
    op: ClassVar[str] = "create_run"
    experiment: str
    local_id: str
    run_name: str | None = None
    tags: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class Status(Record):
    op: ClassVar[str] = "status"
    status: str


@dataclass(frozen=True, kw_only=True)
class Params(Record):
    op: ClassVar[str] = "params"
    params: dict[str, str]


@dataclass(frozen=True, kw_only=True)
class Tags(Record):
    op: ClassVar[str] = "tags"
    tags: dict[str, str]


@dataclass(frozen=True, kw_only=True)
class Metrics(Record):
    op: ClassVar[str] = "metrics"
    metrics: dict[str, float]
    step: int
    system: bool = False


@dataclass(frozen=True, kw_only=True)
class Artifact(Record):
    op: ClassVar[str] = "artifact"
    path: str
    artifact_path: str | None = None


@dataclass(frozen=True, kw_only=True)
class ArtifactDir(Record):
    op: ClassVar[str] = "artifact_dir"
    path: str
    artifact_path: str | None = None


@dataclass(frozen=True, kw_only=True)
class Text(Record):
    op: ClassVar[str] = "text"
    spool: str
    artifact_file: str


@dataclass(frozen=True, kw_only=True)
class Register(Record):
    op: ClassVar[str] = "register"
    name: str
    artifact_path: str
    tags: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class LogModel(Record):
    op: ClassVar[str] = "log_model"
    path: str
    name: str
    step: int
    tags: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class End(Record):
    op: ClassVar[str] = "end"
    status: str


KINDS: dict[str, type[Record]] = {
    kind.op: kind for kind in (CreateRun, Status, Params, Tags, Metrics, Artifact, ArtifactDir, Text, Register,
                               LogModel, End)
}  # fmt: skip


OP = "op"  # the key that says which kind a journal line is


def to_line(record: Record) -> dict[str, Any]:
    return {OP: record.op, **dataclasses.asdict(record)}


def from_line(line: dict[str, Any]) -> Record:
    """A record from its JSON line; fields a newer release added are ignored, an unknown kind is refused."""
    kind = KINDS.get(line.get(OP))
    if kind is None:
        raise ValueError(f"unknown journal record {line.get(OP)!r}")
    known = {f.name for f in dataclasses.fields(kind)}
    return kind(**{k: v for k, v in line.items() if k in known})
