"""Build TorchServe .mar archives from training checkpoints, traceable to their MLflow run.

A .mar holds: the weights alone (a state dict), `meta.json` (what inference needs: classes and
their names, input size and normalization; or the LM's config and context window), `vocab.json`
for the LM, our handler, `handler_common.py`, and the model-definition file copied from
`training/models/` under a `dlops_` name. Nothing in it imports this project.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import torch

from training import tracking
from training.checkpoint import CheckpointError, load_checkpoint

SERVING_DIR = Path(__file__).resolve().parent
HANDLERS = SERVING_DIR / "handlers"
MODELS_DIR = SERVING_DIR.parent / "training" / "models"
DEFAULT_STORE = Path("model_store")


@dataclass(frozen=True)
class ModelKind:
    name: str  # model name in TorchServe, i.e. /predictions/<name>
    handler: str
    model_file: str  # training/models/<model_file>, shipped as dlops_<model_file>


KINDS = {
    "resnet": ModelKind("resnet", "image_classifier.py", "resnet.py"),
    "lm": ModelKind("lm", "text_generator.py", "wordlm.py"),
}


def resolve_checkpoint(
    checkpoint: Path | None, model_uri: str | None, run_id: str | None, workdir: Path
) -> tuple[Path, str | None]:
    """Local path of the checkpoint to package, and the registered model version's name/version."""
    given = [x for x in (checkpoint, model_uri, run_id) if x]
    if len(given) != 1:
        raise ValueError("give exactly one of --checkpoint, --model-uri or --run-id")
    if checkpoint:
        return Path(checkpoint), None
    client = tracking.store_client()
    if model_uri:
        if not model_uri.startswith("models:/") or model_uri.count("/") != 2:
            raise ValueError(f"--model-uri {model_uri!r}: expected models:/NAME/VERSION")
        name, version = model_uri.removeprefix("models:/").split("/")
        source = client.get_model_version(name, version).source
        path = mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(workdir))
        return Path(path), f"{name}/{version}"
    path = mlflow.artifacts.download_artifacts(
        artifact_uri=f"runs:/{run_id}/checkpoints/best.pt", dst_path=str(workdir)
    )
    return Path(path), None


def inference_files(state: dict[str, Any], kind: str, workdir: Path) -> list[Path]:
    """Write the weights and the metadata inference needs; return the files to archive."""
    weights = workdir / "weights.pt"
    torch.save(state["model"], weights)
    meta: dict[str, Any] = {"kind": kind, "run_id": state.get("run_id"), "epoch": state.get("epoch")}
    files = [weights, workdir / "meta.json"]
    if kind == "resnet":
        meta.update(
            arch=state["config"]["arch"],
            stem=state["config"]["stem"],
            classes=state["classes"],
            labels=state["labels"],
            image_size=state["image_size"],
            mean=state["normalization"]["mean"],
            std=state["normalization"]["std"],
        )
    else:
        meta.update(model_config=state["model_config"], window=state["config"]["bptt"])
        (workdir / "vocab.json").write_text(json.dumps(state["vocab"], ensure_ascii=False), encoding="utf-8")
        files.append(workdir / "vocab.json")
    (workdir / "meta.json").write_text(json.dumps(meta, ensure_ascii=False, indent=1), encoding="utf-8")
    return files


def build_mar(
    kind: str,
    checkpoint: Path | None = None,
    model_uri: str | None = None,
    run_id: str | None = None,
    store: Path = DEFAULT_STORE,
    version: str | None = None,
) -> Path:
    """Package a checkpoint as `<store>/<name>.mar`; log it to the source run and tag the model version."""
    spec = KINDS[kind]
    store.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        path, registered = resolve_checkpoint(checkpoint, model_uri, run_id, workdir / "download")
        state = load_checkpoint(path)
        if state["kind"] != kind:
            raise CheckpointError(f"{path} holds a {state['kind']!r} checkpoint; package it as `{state['kind']}`")
        files = inference_files(state, kind, workdir)
        shutil.copy(MODELS_DIR / spec.model_file, workdir / f"dlops_{spec.model_file}")
        shutil.copy(HANDLERS / "handler_common.py", workdir / "handler_common.py")
        shutil.copy(HANDLERS / spec.handler, workdir / spec.handler)
        extra = [workdir / f"dlops_{spec.model_file}", workdir / "handler_common.py", *files[1:]]
        version = version or (registered.split("/")[1] if registered else f"epoch{state.get('epoch', 0)}")
        subprocess.run(
            [
                str(Path(sys.executable).with_name("torch-model-archiver")),
                "--model-name", spec.name,
                "--version", version,
                "--serialized-file", str(files[0]),
                "--handler", str(workdir / spec.handler),
                "--extra-files", ",".join(str(p) for p in extra),
                "--export-path", str(store),
                "--force",
            ],
            check=True,
        )  # fmt: skip
    mar = store / f"{spec.name}.mar"
    print(f"=> wrote {mar} (model {spec.name}, version {version})")
    _record_in_mlflow(mar, state.get("run_id"), registered)
    return mar


def _record_in_mlflow(mar: Path, run_id: str | None, registered: str | None) -> None:
    """Log the .mar to its source run and tag the registered version(s) built from that run."""
    if not run_id:
        return
    if tracking.find_run(run_id) is None:
        print(f"warning: run {run_id} is not in {tracking.tracking_uri()}; the .mar is not logged to MLflow")
        return
    client = tracking.store_client()
    client.log_artifact(run_id, str(mar), "serving")
    versions = client.search_model_versions(f"run_id = '{run_id}'")
    for v in versions:
        if registered is None or f"{v.name}/{v.version}" == registered:
            client.set_model_version_tag(v.name, v.version, "mar", f"runs:/{run_id}/serving/{mar.name}")
    print(f"=> logged {mar.name} to MLflow run {run_id}" + (f" and tagged {registered}" if registered else ""))
