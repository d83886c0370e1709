"""Start, check and stop TorchServe with the project's config, for the .mar files in a model store."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

CONFIG_TEMPLATE = Path(__file__).resolve().parent / "config.properties"
METRICS_CONFIG = Path(__file__).resolve().parent / "metrics.yaml"  # TorchServe's metrics plus our handlers' counters
JAVA_HINT = "TorchServe needs Java 17: sudo apt-get install -y openjdk-17-jre-headless"


class ServeError(RuntimeError):
    pass


@dataclass
class ServeOptions:
    model_store: Path = Path("model_store")
    state_dir: Path = Path("logs/torchserve")
    inference_port: int = 8080
    management_port: int = 8081
    metrics_port: int = 8082
    grpc_inference_port: int = 7070
    grpc_management_port: int = 7071
    auth: bool = True
    workers: int = 1
    batch_size: int = 8
    max_batch_delay_ms: int = 20
    torch_threads: int = 1
    amp: str = "auto"  # the classifier's precision: auto (bf16 where native), off, bf16
    timeout_s: float = 180.0


def read_properties(path: Path) -> dict[str, str]:
    props = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, value = line.split("=", 1)
            props[key.strip()] = value.strip()
    return props


def mar_version(mar: Path) -> str:
    with zipfile.ZipFile(mar) as zf:
        return json.loads(zf.read("MAR-INF/MANIFEST.json"))["model"]["modelVersion"]


def effective_config(options: ServeOptions, mars: list[Path]) -> dict[str, str]:
    """The template's settings with this start's ports, paths, auth and per-model batching."""
    props = read_properties(CONFIG_TEMPLATE)
    store = options.model_store.resolve()
    models = {
        mar.stem: {
            mar_version(mar): {
                "defaultVersion": True,
                "marName": mar.name,
                "minWorkers": options.workers,
                "maxWorkers": options.workers,
                "batchSize": options.batch_size,
                "maxBatchDelay": options.max_batch_delay_ms,
                "responseTimeout": 120,
            }
        }
        for mar in mars
    }
    props.update(
        {
            "inference_address": f"http://127.0.0.1:{options.inference_port}",
            "management_address": f"http://127.0.0.1:{options.management_port}",
            "metrics_address": f"http://127.0.0.1:{options.metrics_port}",
            "grpc_inference_port": str(options.grpc_inference_port),
            "grpc_management_port": str(options.grpc_management_port),
            "disable_token_authorization": str(not options.auth).lower(),
            "model_store": str(store),
            "load_models": ",".join(mar.name for mar in mars),
            "allowed_urls": f"file://{store}/.*",
            "default_workers_per_model": str(options.workers),
            "metrics_config": str(METRICS_CONFIG),
            "models": json.dumps(models),
        }
    )
    return props


def _get(url: str, token: str | None = None, timeout: float = 5.0) -> tuple[int, str]:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read().decode("utf-8", errors="replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode("utf-8", errors="replace")


def read_keys(state_dir: Path) -> dict[str, str]:
    """TorchServe's tokens: {"inference": ..., "management": ...} from key_file.json."""
    path = state_dir / "key_file.json"
    if not path.is_file():
        return {}
    keys = json.loads(path.read_text(encoding="utf-8"))
    return {api: keys[api]["key"] for api in ("inference", "management") if api in keys}


def start(options: ServeOptions) -> dict[str, str]:
    """Start TorchServe in the background with every .mar of the store; wait until all are healthy."""
    if shutil.which("java") is None:
        raise ServeError(f"java was not found on PATH. {JAVA_HINT}")
    mars = sorted(options.model_store.glob("*.mar"))
    if not mars:
        raise ServeError(f"no .mar files in {options.model_store}: run `dlops package resnet|lm ...` first")
    state = options.state_dir.resolve()
    (state / "logs").mkdir(parents=True, exist_ok=True)
    (state / "key_file.json").unlink(missing_ok=True)
    config = state / "config.properties"
    config.write_text("".join(f"{k}={v}\n" for k, v in effective_config(options, mars).items()), encoding="utf-8")
    env = {
        **os.environ,
        "LOG_LOCATION": str(state / "logs"),
        "METRICS_LOCATION": str(state / "logs"),
        "DLOPS_TORCH_THREADS": str(options.torch_threads),
        "DLOPS_SERVE_AMP": options.amp,
    }
    torchserve = Path(sys.executable).with_name("torchserve")
    command = [str(torchserve), "--start", "--ts-config", str(config), "--model-store",
               str(options.model_store.resolve()), "--ncs"]  # fmt: skip
    if not options.auth:
        command.append("--disable-token-auth")
    # The launcher leaves Java running with its output: send it to a file, not a pipe we would wait on.
    launch_log = state / "logs" / "launcher.log"
    with launch_log.open("w") as out:
        returncode = subprocess.run(command, cwd=state, env=env, stdout=out, stderr=subprocess.STDOUT).returncode
    said = launch_log.read_text(errors="replace")
    if returncode != 0 or "already running" in said:
        raise ServeError(f"torchserve did not start: {said.strip()}")
    wait_healthy(options, [m.stem for m in mars])
    print(f"=> TorchServe is up: inference http://127.0.0.1:{options.inference_port}, "
          f"management http://127.0.0.1:{options.management_port}, "
          f"metrics http://127.0.0.1:{options.metrics_port}")  # fmt: skip
    print(f"=> models: {', '.join(m.stem for m in mars)}; logs in {state / 'logs'}")
    keys = read_keys(state)
    if keys:
        print(f"=> token authorization is on; keys in {state / 'key_file.json'}")
    return keys


def wait_healthy(options: ServeOptions, models: list[str]) -> None:
    """Poll /ping and each model's worker status until all workers are READY."""
    deadline = time.monotonic() + options.timeout_s
    pending = list(models)
    log = options.state_dir / "logs" / "ts_log.log"
    while time.monotonic() < deadline:
        keys = read_keys(options.state_dir)
        try:
            for model in list(pending):
                url = f"http://127.0.0.1:{options.management_port}/models/{model}"
                status, body = _get(url, keys.get("management"))
                if status == 200 and json.loads(body)[0]["workers"]:
                    workers = json.loads(body)[0]["workers"]
                    if all(w["status"] == "READY" for w in workers):
                        pending.remove(model)
            if not pending:
                return
        except (urllib.error.URLError, ConnectionError, TimeoutError, json.JSONDecodeError):
            pass  # not listening yet
        time.sleep(1.0)
    raise ServeError(f"models {pending} not healthy after {options.timeout_s:.0f} s; see {log}")


def stop() -> str:
    torchserve = Path(sys.executable).with_name("torchserve")
    result = subprocess.run([str(torchserve), "--stop"], capture_output=True, text=True, timeout=60)
    return (result.stdout + result.stderr).strip()
