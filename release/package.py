"""Build versioned TorchServe .mar archives from training checkpoints, traceable to their MLflow run.

    model_store/<name>-<version>.mar     e.g. resnet-3.mar (registry version 3), lm-e4-1a2b3c4d.mar

The version is the registry's version number when the checkpoint came from the registry, else
the epoch and a hash of the weights; earlier archives stay in the store (a rollback needs them).
A .mar holds: the weights alone (a state dict), `meta.json` (the model config and what inference
needs, as the job declares it, plus the weights' hash and where they came from), the job's
handler with the code it imports (ServingSpec.files()), and `model-config.yaml`, TorchServe's
per-model settings (workers, batching, response timeout), so that any TorchServe that loads the
archive (`dlops serve`, the compose file, KServe) serves it the same way. Nothing in it imports
this project.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from serving.secrets import child_environment
from serving.server import executable
from training import tracking
from training.checkpoint import CheckpointError, load_checkpoint
from training.jobs import JobSpec, job_for
from training.tracking import registry
from training.tracking.artifacts import ARCHIVES

DEFAULT_STORE = Path("model_store")


@dataclass(kw_only=True, frozen=True)
class ModelSettings:
    """TorchServe's per-model settings, written into the .mar as model-config.yaml. On a CPU one
    worker per model with one torch thread serves fastest (docs/serving.md has the measurements)."""

    workers: int = 1
    batch_size: int = 8
    max_batch_delay_ms: int = 20
    response_timeout_s: int = 120

    def yaml(self) -> str:
        return (f"minWorkers: {self.workers}\nmaxWorkers: {self.workers}\nbatchSize: {self.batch_size}\n"
                f"maxBatchDelay: {self.max_batch_delay_ms}\nresponseTimeout: {self.response_timeout_s}\n")  # fmt: skip


@dataclass(kw_only=True, frozen=True)
class Source:
    """A checkpoint to package and where it came from."""

    path: Path
    registered: str | None = None  # "NAME/VERSION" in the MLflow registry
    given: str = ""  # as the user named it: a path, a model URI, a run id


def resolve_source(checkpoint: Path | str | None, model_uri: str | None, run_id: str | None, workdir: Path) -> Source:
    """The local checkpoint of exactly one of: a file (or model URI) given as --checkpoint, a model
    URI (models:/NAME/VERSION, @ALIAS or /latest), or a run's checkpoints/best.pt."""
    given = [x for x in (checkpoint, model_uri, run_id) if x]
    if len(given) != 1:
        raise ValueError("give exactly one of --checkpoint, --model-uri or --run-id")
    if run_id:
        return Source(path=tracking.download_run_checkpoint(run_id, workdir), given=f"run {run_id}")
    path, version = registry.local_checkpoint(str(given[0]), workdir)
    return Source(path=path, registered=f"{version.name}/{version.version}" if version else None, given=str(given[0]))


def weights_hash(weights: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(weights):
        digest.update(name.encode())
        digest.update(weights[name].detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def archive_meta(state: dict[str, Any], job: JobSpec, source: Source, digest: str) -> dict[str, Any]:
    """meta.json: the model's config and what inference needs (the job's inference keys), traceable."""
    meta = {"kind": state["kind"], "run_id": state.get("run_id"), "epoch": state.get("epoch"),
            "model_config": state["model_config"], "weights_sha256": digest, "registered": source.registered,
            "source": source.given}  # fmt: skip
    return {**meta, **{key: state[key] for key in job.serving.inference_keys if key in state}}


def read_archive_meta(mar: Path) -> dict[str, Any]:
    with zipfile.ZipFile(mar) as zf:
        return json.loads(zf.read("meta.json"))


def _same_archive(mar: Path, digest: str, settings: ModelSettings) -> bool:
    with zipfile.ZipFile(mar) as zf:
        names = set(zf.namelist())
        config = zf.read("model-config.yaml").decode() if "model-config.yaml" in names else None
    return read_archive_meta(mar).get("weights_sha256") == digest and config == settings.yaml()


def archive_version(state: dict[str, Any], source: Source, digest: str, store: Path, name: str) -> str:
    """The registry version, else epoch and weights hash; made unique if another archive of that
    name in the store holds other weights."""
    version = source.registered.split("/")[1] if source.registered else f"e{state.get('epoch', 0)}-{digest[:8]}"
    existing = store / f"{name}-{version}.mar"
    if existing.is_file() and read_archive_meta(existing).get("weights_sha256") != digest:
        version = f"{version}-{digest[:8]}"
    return version


def write_uncompressed(archive: Path, target: Path) -> None:
    """Copy a zip archive to `target` with every entry stored, not deflated. TorchServe extracts an archive
    it registers in the thread that also answers inference requests: a deflated resnet18 .mar held
    them for 0.39-0.45 s, a stored one (7% larger: float weights hardly compress) for 0.09-0.12 s."""
    part = target.with_name(target.name + ".part")
    with zipfile.ZipFile(archive) as source, zipfile.ZipFile(part, "w", zipfile.ZIP_STORED) as stored:
        for item in source.infolist():
            info = zipfile.ZipInfo(item.filename, item.date_time)
            info.external_attr, info.file_size = item.external_attr, item.file_size
            with source.open(item) as entry, stored.open(info, "w") as copy:
                shutil.copyfileobj(entry, copy, 1 << 20)
    part.replace(target)  # whole or not at all: a server may read the store meanwhile


def build_mar(kind: str, source: Source, *, store: Path = DEFAULT_STORE, settings: ModelSettings | None = None,
              version: str | None = None, log_to_mlflow: bool = True) -> Path:  # fmt: skip
    """Package `source` as `<store>/<name>-<version>.mar`; log it to the source run and tag the version."""
    job = job_for(kind)
    spec = job.serving
    if spec is None:
        raise ValueError(f"the {kind} job declares no serving (no handler in its JobSpec): there is nothing to "
                         "package; its checkpoints are registered as files (`dlops evaluate` reads them)")  # fmt: skip
    settings = settings or ModelSettings()
    store.mkdir(parents=True, exist_ok=True)
    state = load_checkpoint(source.path)
    state["run_id"] = tracking.server_run_id(source.path.parent, state.get("run_id"))
    if state["kind"] != kind:
        raise CheckpointError(f"{source.path} holds a {state['kind']!r} checkpoint; package it as `{state['kind']}`")
    digest = weights_hash(state["model"])
    version = version or archive_version(state, source, digest, store, spec.name)
    mar = store / f"{spec.name}-{version}.mar"
    if mar.is_file() and _same_archive(mar, digest, settings):
        print(f"=> {mar} holds these weights and settings already")
        return mar
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        weights = workdir / "weights.pt"
        torch.save(state["model"], weights)
        meta = workdir / "meta.json"
        meta.write_text(json.dumps(archive_meta(state, job, source, digest), ensure_ascii=False, indent=1),
                        encoding="utf-8")  # fmt: skip
        config = workdir / "model-config.yaml"
        config.write_text(settings.yaml(), encoding="utf-8")
        shipped = {name: Path(shutil.copy(path, workdir / name)) for path, name in spec.files().items()}
        handler = shipped.pop(spec.handler.name)
        subprocess.run(
            [
                executable("torch-model-archiver"),
                "--model-name", spec.name,
                "--version", version,
                "--serialized-file", str(weights),
                "--handler", str(handler),
                "--extra-files", ",".join(str(p) for p in [meta, *shipped.values()]),
                "--config-file", str(config),
                "--export-path", str(workdir),
                "--force",
            ],
            check=True,
            # the archiver stages files in TMPDIR/<model name>, shared by every packaging of that name on the
            # machine: two at once (two users, a sweep and a deploy) delete each other's files mid-archive
            env=child_environment("torchserve", extra={"TMPDIR": str(workdir)}),
        )  # fmt: skip
        write_uncompressed(workdir / f"{spec.name}.mar", mar)
    print(f"=> wrote {mar} (model {spec.name}, version {version}; {settings.workers} worker(s), batches of up to "
          f"{settings.batch_size} within {settings.max_batch_delay_ms} ms)")  # fmt: skip
    if log_to_mlflow:
        _record_in_mlflow(mar, state.get("run_id"), source.registered)
    return mar


def _record_in_mlflow(mar: Path, run_id: str | None, registered: str | None) -> None:
    """Log the .mar to its source run and tag the registered version(s) built from that run."""
    if not run_id:
        return
    if tracking.find_run(run_id) is None:
        print(f"warning: run {run_id} is not in {tracking.tracking_uri()}; the .mar is not logged to MLflow")
        return
    client = tracking.store_client()
    client.log_artifact(run_id, str(mar), ARCHIVES)
    versions = client.search_model_versions(f"run_id = '{run_id}'")
    for v in versions:
        if registered is None or f"{v.name}/{v.version}" == registered:
            client.set_model_version_tag(v.name, v.version, "mar", f"runs:/{run_id}/serving/{mar.name}")
    print(f"=> logged {mar.name} to MLflow run {run_id}" + (f" and tagged {registered}" if registered else ""))
