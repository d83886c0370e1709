"""The model registry: model URIs, MLflow models of our checkpoints, aliases, and what serves.

    models:/NAME/VERSION   models:/NAME@ALIAS   models:/NAME/latest

Every option that takes a model URI resolves it here (`resolve`, `local_checkpoint`). A version
registered by this release is an MLflow model (a LoggedModel of its training run, with the run's
metrics at the best epoch): the pyfunc model in serving/handlers/mlflow_model.py, whose artifact
is an inference checkpoint; versions of earlier releases point at a run's checkpoints/best.pt,
and both resolve to a checkpoint file that every command reads the same way.

`promote` moves an alias (optionally only to a better version); deploys record what serves as an
alias and as version tags (`record_event`).
"""

from __future__ import annotations

import re
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import LoggedModelOutput, Metric
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.models import Model
from mlflow.tracking import MlflowClient

from serving.secrets import redact
from training.checkpoint import file_sha256, load_checkpoint
from training.metrics import SYSTEM_PREFIX
from training.tracking.journal import server_run_id
from training.tracking.sources import check_location
from training.tracking.store import quiet_downloads, refusals_explained, store_client, tracking_uri
from training.tracking.tags import CHECKPOINT_DIGEST, JOB_TAG, REGISTERED_MODEL, trained_kind

URI_PATTERN = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>\d+|latest)|@(?P<alias>[\w-]+))$")
URI_FORMS = "models:/NAME/VERSION, models:/NAME@ALIAS or models:/NAME/latest"
CHECKPOINT_ARTIFACT = "checkpoint"  # the MLflow model's artifact name: artifacts/checkpoint.pt
SOURCE_TAG = "dlops_source"  # on a LoggedModel: which run's journal record made it (delivery is idempotent)


class RegistryError(ValueError):
    """A model URI that does not resolve, or a registry operation that cannot be done."""


@dataclass(kw_only=True, frozen=True)
class ModelRef:
    name: str
    version: str | None = None  # a number
    alias: str | None = None
    latest: bool = False

    def __str__(self) -> str:
        if self.alias:
            return f"models:/{self.name}@{self.alias}"
        return f"models:/{self.name}/{'latest' if self.latest else self.version}"


def is_model_uri(text: str) -> bool:
    return str(text).startswith("models:/")


def parse_model_uri(uri: str) -> ModelRef:
    match = URI_PATTERN.match(uri.strip())
    if not match:
        raise RegistryError(f"{uri!r}: expected {URI_FORMS}")
    version = match["version"]
    return ModelRef(
        name=match["name"],
        version=None if version == "latest" else version,
        alias=match["alias"],
        latest=version == "latest",
    )


def resolve(uri: str, client: MlflowClient | None = None) -> ModelVersion:
    """The model version a URI names: a number, an alias, or the newest version."""
    ref, client = parse_model_uri(uri), client or store_client()
    try:
        if ref.alias:
            return client.get_model_version_by_alias(ref.name, ref.alias)
        if ref.latest:
            versions = client.search_model_versions(f"name = '{ref.name}'")
            if not versions:
                raise RegistryError(f"{uri}: model {ref.name!r} has no versions in {redact(tracking_uri())}")
            return max(versions, key=lambda v: int(v.version))
        return client.get_model_version(ref.name, ref.version)
    except MlflowException as e:
        raise RegistryError(f"{uri}: not in the registry of {redact(tracking_uri())} ({e.message})") from e


def _is_mlflow_model(version: ModelVersion) -> bool:
    return bool(version.model_id) or version.source.startswith("models:/")


def checkpoint_location(version: ModelVersion, client: MlflowClient) -> str:
    """Where the version's checkpoint file lives, resolved to a store URI: the MLflow model's inference
    checkpoint, or (versions of earlier releases and jobs without serving) the registered file."""
    if _is_mlflow_model(version):
        model_id = version.model_id or version.source.removeprefix("models:/")
        location = client.get_logged_model(model_id).artifact_location
        return f"{location.rstrip('/')}/artifacts/{CHECKPOINT_ARTIFACT}.pt"
    if version.source.startswith("runs:/"):
        run_id, _, path = version.source.removeprefix("runs:/").partition("/")
        return f"{client.get_run(run_id).info.artifact_uri.rstrip('/')}/{path}"
    return version.source


def download_checkpoint(uri: str, workdir: Path) -> tuple[Path, ModelVersion]:
    """A local checkpoint of the version `uri` names, fetched only from the tracking server or a trusted
    store (tracking/sources.py) and checked against the SHA-256 recorded when it was registered."""
    client = store_client()
    version = resolve(uri, client)
    label = f"{version.name}/{version.version}"
    artifact = checkpoint_location(version, client)
    check_location(artifact, tracking_uri=tracking_uri(), version=label)
    path = Path(mlflow.artifacts.download_artifacts(artifact_uri=artifact, dst_path=str(workdir)))
    recorded = version.tags.get(CHECKPOINT_DIGEST)
    if recorded is None:
        print(f"=> model version {label} has no recorded {CHECKPOINT_DIGEST} (registered before dlops recorded "
              "one): its checkpoint cannot be checked", flush=True)  # fmt: skip
    elif (actual := file_sha256(path)) != recorded:
        raise RegistryError(f"model version {label}: the checkpoint downloaded from {artifact} has SHA-256 "
                            f"{actual[:16]}..., not the {recorded[:16]}... recorded when it was registered: its "
                            "files changed since. Refusing to use it")  # fmt: skip
    return path, version


def digest_tag(checkpoint: Path) -> dict[str, str]:
    """The version tag that records `checkpoint`'s SHA-256 (checked at every download)."""
    return {CHECKPOINT_DIGEST: file_sha256(checkpoint)}


def local_checkpoint(source: str | Path, workdir: Path) -> tuple[Path, ModelVersion | None]:
    """A checkpoint file for `source`: a path as it is, or a model URI downloaded into `workdir`."""
    if is_model_uri(str(source)):
        return download_checkpoint(str(source), workdir)
    path = Path(source)
    if not path.is_file():
        raise RegistryError(f"{source}: no such checkpoint file (or give {URI_FORMS})")
    return path, None


@contextmanager
def checkpoint_file(source: str | Path) -> Iterator[Path]:
    """`source` (a checkpoint file or a model URI) as a local file while the block runs."""
    with tempfile.TemporaryDirectory() as tmp:
        yield local_checkpoint(source, Path(tmp))[0]


def load_source(source: str | Path, kind: str | None = None) -> tuple[dict[str, Any], str]:
    """The checkpoint `source` names (a file or a model URI), loaded, and `source` as runs record it
    (a resolved path, or the URI). Its run_id is the tracking server's (offline runs: after sync)."""
    with checkpoint_file(source) as path:
        state = load_checkpoint(path, kind=kind)
    if is_model_uri(str(source)):
        return state, str(source)
    state["run_id"] = server_run_id(Path(source).parent, state.get("run_id"))
    return state, str(Path(source).resolve())


# --- MLflow models of our checkpoints -----------------------------------------------------------------


def pinned_requirements() -> list[str]:
    """What loading the MLflow model needs, at the versions this project pins."""
    import PIL
    import torch
    import torchvision

    return [f"mlflow=={mlflow.__version__}", f"torch=={torch.__version__.split('+')[0]}",
            f"torchvision=={torchvision.__version__.split('+')[0]}", f"pillow=={PIL.__version__}"]  # fmt: skip


def save_mlflow_model(directory: Path, *, python_model: Path, checkpoint: Path, code: Mapping[Path, str],
                      handler: str, handler_class: str, example: Mapping[str, Any], answer: Any) -> Path:  # fmt: skip
    """Write the pyfunc model (models-from-code file `python_model`) of an inference checkpoint to
    `directory`; no tracking server needed.

    `code` maps source files to the names the handler imports them by (ServingSpec.files());
    `example` is one request as named fields (the input example) and `answer` the model's answer
    to it: the signature is inferred from both.
    """
    import pandas as pd
    from mlflow.models import infer_signature

    if checkpoint.name != f"{CHECKPOINT_ARTIFACT}.pt":
        raise ValueError(f"{checkpoint}: the MLflow model's checkpoint must be named {CHECKPOINT_ARTIFACT}.pt")
    example_frame = pd.DataFrame([dict(example)])

    quiet_downloads()
    shutil.rmtree(directory, ignore_errors=True)
    with tempfile.TemporaryDirectory() as tmp:
        staged = []
        for source, name in code.items():
            staged.append(str(shutil.copy(source, Path(tmp) / name)))
        with warnings.catch_warnings():  # MLflow's hints about integer columns and type hints: not ours to act on
            warnings.simplefilter("ignore", UserWarning)
            mlflow.pyfunc.save_model(
                path=str(directory),
                python_model=str(python_model),
                artifacts={CHECKPOINT_ARTIFACT: str(checkpoint)},
                code_paths=staged,
                model_config={"handler": Path(handler).stem, "handler_class": handler_class},
                input_example=example_frame,
                signature=infer_signature(example_frame, [answer]),
                pip_requirements=pinned_requirements(),
            )
    return directory


def _link_metrics(client: MlflowClient, run_id: str, model_id: str, step: int) -> None:
    """The run's metrics at `step` (the best epoch) linked to the model, as MLflow's log_model links them."""
    run = client.get_run(run_id)
    linked = []
    for key in run.data.metrics:
        if key.startswith(SYSTEM_PREFIX):  # sampled on their own clock: their steps are not epochs
            continue
        for m in client.get_metric_history(run_id, key):
            if m.step == step and m.model_id is None:
                linked.append(Metric(m.key, m.value, m.timestamp, m.step, model_id=model_id, run_id=run_id))
    for start in range(0, len(linked), 500):
        client.log_batch(run_id, metrics=linked[start : start + 500])


def log_mlflow_model(client: MlflowClient, run_id: str, model_dir: Path, *, registered_name: str,
                     tags: Mapping[str, str], step: int, source_key: str) -> str:  # fmt: skip
    """Log a saved MLflow model as a LoggedModel of run `run_id` and register it; return the version.

    Idempotent on `source_key` (a journal record): after a crash or a failed call the same model
    and version are found again, never made twice.
    """
    run = client.get_run(run_id)
    experiment_id = run.info.experiment_id
    found = client.search_logged_models([experiment_id], filter_string=f"tags.{SOURCE_TAG} = '{source_key}'")
    if found:
        logged = found[0]
    else:
        params = {k: v[:6000] for k, v in run.data.params.items()}
        logged = client.create_logged_model(experiment_id, name="model", source_run_id=run_id, params=params,
                                            tags={SOURCE_TAG: source_key, REGISTERED_MODEL: registered_name},
                                            model_type=run.data.tags.get(JOB_TAG))  # fmt: skip
    if str(logged.status) != "READY":
        with tempfile.TemporaryDirectory() as tmp:
            staged = Path(shutil.copytree(model_dir, Path(tmp) / "model"))
            description = Model.load(str(staged / "MLmodel"))
            description.model_id = description.model_uuid = logged.model_id
            description.run_id, description.artifact_path = run_id, logged.artifact_location
            description.save(str(staged / "MLmodel"))
            client.log_model_artifacts(logged.model_id, str(staged))
        client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step)])
        _link_metrics(client, run_id, logged.model_id, step)
        client.finalize_logged_model(logged.model_id, "READY")
    try:
        client.create_registered_model(registered_name)
    except MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    source = f"models:/{logged.model_id}"
    for existing in client.search_model_versions(f"run_id = '{run_id}'"):
        if existing.name == registered_name and existing.source == source:
            return existing.version
    tags = {**tags, **digest_tag(model_dir / "artifacts" / f"{CHECKPOINT_ARTIFACT}.pt")}
    version = client.create_model_version(registered_name, source=source, run_id=run_id, tags=tags,
                                          model_id=logged.model_id)  # fmt: skip
    return version.version


# --- aliases: promote, and what serves -----------------------------------------------------------------


def best_metric_name(metric: str) -> str:
    """The run metric holding a validation metric's value at the best epoch: val/acc1 -> best/val_acc1."""
    return "best/" + metric.replace("/", "_")


def version_metric(version: ModelVersion, metric: str, client: MlflowClient) -> float:
    """The version's value of a validation metric: its training run's value at the best epoch."""
    if not version.run_id:
        raise RegistryError(f"{version.name}/{version.version} has no training run to read {metric} from")
    metrics = client.get_run(version.run_id).data.metrics
    if best_metric_name(metric) not in metrics:
        raise RegistryError(f"run {version.run_id} of {version.name}/{version.version} has no "
                            f"{best_metric_name(metric)}")  # fmt: skip
    return metrics[best_metric_name(metric)]


def job_kind(version: ModelVersion, client: MlflowClient) -> str | None:
    """The kind of job that trained the version, from its run's tags."""
    if not version.run_id:
        return None
    return trained_kind(client.get_run(version.run_id).data.tags)


@dataclass(kw_only=True, frozen=True)
class Promotion:
    moved: bool
    message: str


def promote(uri: str, alias: str, *, metric: str | None = None, higher_is_better: bool = True) -> Promotion:
    """Point `alias` at the version `uri` names; with `metric`, only when the version's value beats
    the current holder's (which way is better: `higher_is_better`). A server that refuses (moving an
    alias is a privilege there) is a TrackingRefused saying who may."""
    with refusals_explained(tracking_uri()):
        return _promote(uri, alias, metric=metric, higher_is_better=higher_is_better)


def _promote(uri: str, alias: str, *, metric: str | None, higher_is_better: bool) -> Promotion:
    client = store_client()
    version = resolve(uri, client)
    name = f"{version.name}/{version.version}"
    try:
        holder = client.get_model_version_by_alias(version.name, alias)
    except MlflowException:
        holder = None
    if holder is not None and holder.version == version.version:
        return Promotion(moved=False, message=f"@{alias} already points at {name}")
    if metric is not None and holder is not None:
        ours, theirs = version_metric(version, metric, client), version_metric(holder, metric, client)
        comparison = (f"{metric} {ours:.4f} ({name}) against {theirs:.4f} "
                      f"({version.name}/{holder.version}, @{alias} now)")  # fmt: skip
        if not (ours > theirs if higher_is_better else ours < theirs):
            return Promotion(moved=False, message=f"@{alias} stays on {version.name}/{holder.version}: {comparison}; "
                                    f"{'higher' if higher_is_better else 'lower'} is better")  # fmt: skip
        client.set_registered_model_alias(version.name, alias, version.version)
        return Promotion(moved=True, message=f"@{alias} moved to {name}: {comparison}")
    client.set_registered_model_alias(version.name, alias, version.version)
    was = f" (was {version.name}/{holder.version})" if holder is not None else ""
    return Promotion(moved=True, message=f"@{alias} now points at {name}{was}")


def record_event(name: str, version: str, event: str, alias: str | None = None) -> None:
    """Note a deploy event on a version as a tag `deploy.<UTC time>` (the deploy history), and move
    `alias` to it when given (the version now serving)."""
    with refusals_explained(tracking_uri()):
        _record_event(name, version, event, alias)


def _record_event(name: str, version: str, event: str, alias: str | None) -> None:
    client = store_client()
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    existing = client.get_model_version(name, version).tags
    key, n = f"deploy.{stamp}", 1
    while key in existing:  # two events within a second
        n += 1
        key = f"deploy.{stamp}.{n}"
    client.set_model_version_tag(name, version, key, event[:5000])
    if alias:
        client.set_registered_model_alias(name, alias, version)


def deploy_history(name: str, version: str) -> list[tuple[str, str]]:
    """(tag, event) of every deploy event recorded on a version, oldest first."""
    tags = store_client().get_model_version(name, version).tags
    return sorted((k, v) for k, v in tags.items() if k.startswith("deploy."))
