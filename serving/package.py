"""Build TorchServe .mar archives from training checkpoints, traceable to their MLflow run.

A .mar holds: the weights alone (a state dict), `meta.json` (the model config and what inference
needs, as the job declares it: class names, input size and normalization; or the vocabulary and
context window), the job's handler, `handler_common.py` (the base every handler shares),
`dlops_hardware.py` and the model-definition file copied from `training/models/` under a `dlops_`
name. Nothing in it imports this project. Which files a kind needs comes from its job
declaration (training/jobs/), so a new job needs no change here.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from training import tracking
from training.checkpoint import CheckpointError, load_checkpoint
from training.jobs import Job, job_for

SERVING_DIR = Path(__file__).resolve().parent
HANDLERS = SERVING_DIR / "handlers"
TRAINING_DIR = SERVING_DIR.parent / "training"
DEFAULT_STORE = Path("model_store")
# Shipped in every .mar: the handler base, the request-field declarations, the hardware facts.
COMMON_FILES = {
    HANDLERS / "handler_common.py": "handler_common.py",
    HANDLERS / "request_fields.py": "request_fields.py",
    TRAINING_DIR / "hardware.py": "dlops_hardware.py",
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
    if model_uri:
        return tracking.download_registered_checkpoint(model_uri, workdir)
    return tracking.download_run_checkpoint(run_id, workdir), None


def inference_meta(state: dict[str, Any], job: type[Job]) -> dict[str, Any]:
    """meta.json: the model's config and what inference needs (the job's inference keys), traceable to its run."""
    meta = {"kind": state["kind"], "run_id": state.get("run_id"), "epoch": state.get("epoch"),
            "model_config": state["model_config"]}  # fmt: skip
    return {**meta, **{key: state[key] for key in job.serving.inference_keys}}


def build_mar(
    kind: str,
    checkpoint: Path | None = None,
    model_uri: str | None = None,
    run_id: str | None = None,
    store: Path = DEFAULT_STORE,
    version: str | None = None,
) -> Path:
    """Package a checkpoint as `<store>/<name>.mar`; log it to the source run and tag the model version."""
    job = job_for(kind)
    spec = job.serving
    store.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        path, registered = resolve_checkpoint(checkpoint, model_uri, run_id, workdir / "download")
        state = load_checkpoint(path)
        state["run_id"] = tracking.server_run_id(path.parent, state.get("run_id"))
        if state["kind"] != kind:
            raise CheckpointError(f"{path} holds a {state['kind']!r} checkpoint; package it as `{state['kind']}`")
        weights = workdir / "weights.pt"
        torch.save(state["model"], weights)
        meta = workdir / "meta.json"
        meta.write_text(json.dumps(inference_meta(state, job), ensure_ascii=False, indent=1), encoding="utf-8")
        shipped = {**COMMON_FILES, TRAINING_DIR / "models" / spec.model_file: f"dlops_{spec.model_file}"}
        extra = [meta]
        for source, name in shipped.items():
            extra.append(Path(shutil.copy(source, workdir / name)))
        handler = Path(shutil.copy(HANDLERS / spec.handler, workdir / spec.handler))
        version = version or (registered.split("/")[1] if registered else f"epoch{state.get('epoch', 0)}")
        subprocess.run(
            [
                str(Path(sys.executable).with_name("torch-model-archiver")),
                "--model-name", spec.name,
                "--version", version,
                "--serialized-file", str(weights),
                "--handler", str(handler),
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
