"""Shared fixtures: generated datasets on disk and a real MLflow SQLite store per test module."""

from __future__ import annotations

import http.server
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pytest
from click.testing import CliRunner, Result
from mlflow.tracking import MlflowClient

from training.cli import main
from training.jobs.resnet.data.synthetic import write_synthetic_tinyimagenet

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"
MINI_TINYIMAGENET = SHARED_DATA / "tiny-imagenet-200-mini"
WIKITEXT_VALID = SHARED_DATA / "wikitext-2" / "valid.txt"


@pytest.fixture(scope="session", autouse=True)
def test_environment(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Settings every test and its subprocesses share."""
    os.environ["MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL"] = "1"
    # decoded caches and the record of checked datasets go to the session's folder, not the repo's data/
    os.environ["DLOPS_CACHE_DIR"] = str(tmp_path_factory.mktemp("cache"))
    # the MLflow servers tests start run no GenAI job runners (8 processes each, unused here)
    os.environ["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"


class ModuleTemp:
    """Folders for what a module's tests share (runs, tracking store, model stores, servers' state)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def mktemp(self, name: str) -> Path:
        folder = self.root / name
        folder.mkdir()
        return folder


@pytest.fixture(scope="module")
def module_tmp(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ModuleTemp]:
    """tmp_path_factory for one module, its folder removed after the module when none of its tests
    failed: checkpoints and archives run to hundreds of MB a module, so the suite's disk peak stays a
    module's worth per worker instead of the session's sum (12 GB once, more than some CI disks had)."""
    root = tmp_path_factory.mktemp(request.module.__name__.rpartition(".")[2])
    failed_before = request.session.testsfailed
    yield ModuleTemp(root)
    if request.session.testsfailed == failed_before:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module", autouse=True)
def tracking_store(module_tmp: ModuleTemp) -> str:
    """A real SQLite-backed MLflow store for the module (created on first use, ~1.3 s)."""
    uri = f"sqlite:///{module_tmp.mktemp('mlruns') / 'mlflow.db'}"
    os.environ["MLFLOW_TRACKING_URI"] = uri  # subprocesses inherit it too
    mlflow.set_tracking_uri(uri)
    return uri


@pytest.fixture(scope="module")
def client(tracking_store: str) -> MlflowClient:
    return MlflowClient(tracking_store)


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 learnable classes, 12 train and 4 val JPEGs each, in Tiny-ImageNet's original layout."""
    return write_synthetic_tinyimagenet(
        tmp_path_factory.mktemp("data") / "tiny", num_classes=4, train_per_class=12, val_per_class=4, progress=False
    )


def run_cli(*args: str) -> Result:
    """Run `dlops ARGS` in-process; fail the test with the output when it exits non-zero."""
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


def cli_error(*args: str) -> str:
    """Run `dlops ARGS` expecting a clear failure (exit 1-2); return its output."""
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code in (1, 2), (result.exit_code, result.output, result.exception)
    return result.output


def dlops_process(*args: str, **kwargs) -> subprocess.Popen:
    """`dlops ARGS` as a real subprocess (for kill/resume tests)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "training.cli", *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        cwd=REPO,
        **kwargs,
    )


def latest_run(client: MlflowClient, experiment: str, **filters: str):
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"experiment {experiment} was not created"
    query = " and ".join(f"tags.{k} = '{v}'" for k, v in filters.items())
    runs = client.search_runs([exp.experiment_id], filter_string=query, order_by=["start_time DESC"], max_results=1)
    assert runs, f"no run in {experiment} matching {filters}"
    return runs[0]


def artifact_paths(client: MlflowClient, run_id: str, path: str | None = None) -> list[str]:
    found = []
    for item in client.list_artifacts(run_id, path):
        found.extend(artifact_paths(client, run_id, item.path) if item.is_dir else [item.path])
    return found


def metric_steps(client: MlflowClient, run_id: str, metric: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, metric))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Listener:
    """An HTTP server on 127.0.0.1 that answers 200 to anything and records each request (method, path,
    Authorization header): what a planted URL would have received."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str, str | None]] = []
        listener = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _any(self) -> None:
                listener.requests.append((self.command, self.path, self.headers.get("Authorization")))
                self.send_response(200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

            do_GET = do_POST = do_PUT = do_HEAD = _any  # noqa: N815 - http.server's names

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> Listener:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def start_tracking_server(root: Path, *args: str, env: dict[str, str]) -> subprocess.Popen:
    """`dlops tracking-server ARGS` writing root/server.log, in a session of its own (stop it with
    stop_process_group); returns once it has said how teammates reach it."""
    log = root / "server.log"
    with log.open("w") as out:
        process = subprocess.Popen([sys.executable, "-m", "training.cli", "tracking-server", *map(str, args)],
                                   stdout=out, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True,
                                   env={**os.environ, "PYTHONUNBUFFERED": "1", **env})  # fmt: skip
    deadline = time.monotonic() + 180
    while "=> teammates" not in log.read_text():
        if process.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"tracking-server did not start: {log.read_text()[-3000:]}")
        time.sleep(0.5)
    return process


def stop_process_group(process: subprocess.Popen) -> None:
    os.killpg(process.pid, signal.SIGTERM)
    process.wait(timeout=60)
