"""Training survives the tracking server: a real `mlflow server` killed and restarted around real
training processes, offline runs delivered by `dlops sync`, and concurrent first use of a store."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import REPO, artifact_paths, free_port, latest_run, metric_steps
from training.tracking import Journal

FAST = ["-b", "8", "-j", "0", "-p", "0", "--lr", "0.02"]
EPOCH_METRICS = ("train/loss", "val/loss", "val/acc1", "lr", "time/epoch_seconds")
CORES = sorted(os.sched_getaffinity(0))
SERVER_CORE = ["taskset", "-c", str(CORES[-1])] if len(CORES) > 1 and shutil.which("taskset") else []
TRAINING_CORES = ",".join(map(str, CORES[:-1]))


class Server:
    """`mlflow server` on a SQLite file and a fixed port, which a test kills and starts again."""

    def __init__(self, root: Path):
        self.root, self.port = root, free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        command = [
            str(Path(sys.executable).with_name("mlflow")), "server",
            "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
            "--artifacts-destination", str(self.root / "artifacts"), "--host", "127.0.0.1", "--port", str(self.port),
            "--workers", "1", "--allowed-hosts", f"127.0.0.1:{self.port}",
        ]  # fmt: skip
        log = (self.root / "server.log").open("a")
        # On its own core and niced, as if on its own machine: a server starting up on the training's
        # cores would slow training through CPU contention, which is not what the tests measure.
        self.process = subprocess.Popen([*SERVER_CORE, "nice", "-n", "19", *command], stdout=log,
                                        stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2):
                    return
            except OSError:
                time.sleep(0.5)
        raise AssertionError(f"mlflow server did not start: {(self.root / 'server.log').read_text()[-2000:]}")

    def kill(self) -> None:
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)


@pytest.fixture()
def server(tmp_path):
    server = Server(tmp_path)
    server.start()
    yield server
    if server.process and server.process.poll() is None:
        server.kill()


def train_process(uri: str, data: Path, *args: str, pinned: bool = False) -> subprocess.Popen:
    """`dlops train resnet` as a process; `pinned`: on the cores the server does not use, one thread."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PYTHONUNBUFFERED": "1"}
    prefix = []
    if pinned and SERVER_CORE:
        prefix, env["OMP_NUM_THREADS"] = ["taskset", "-c", TRAINING_CORES], "1"
    command = [*prefix, sys.executable, "-m", "training.cli", "train", "resnet", str(data), *FAST, *args]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            cwd=REPO)  # fmt: skip


def wait_for(process: subprocess.Popen, needle: str, seen: list[str]) -> None:
    for line in process.stdout:
        seen.append(line)
        if needle in line:
            return
    raise AssertionError(f"{needle!r} never printed:\n{''.join(seen)[-3000:]}")


def dlops(uri: str, *args) -> subprocess.CompletedProcess:
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    return subprocess.run([sys.executable, "-m", "training.cli", *map(str, args)], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=600)  # fmt: skip


def assert_complete(client: MlflowClient, run_id: str, epochs: int) -> None:
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    for metric in EPOCH_METRICS:
        assert metric_steps(client, run_id, metric) == list(range(1, epochs + 1)), metric  # every step exactly once
    artifacts = set(artifact_paths(client, run_id))
    assert {"checkpoints/best.pt", "checkpoints/last.pt", "learning_curves.png", "model_summary.txt"} <= artifacts
    assert any(a.startswith("tensorboard/events.out.tfevents") for a in artifacts)


def test_training_goes_on_through_an_outage_and_every_record_arrives_once(server, tiny_dataset, tmp_path):
    """The server is killed after epoch 1 and started again later: epochs go on training while it is
    down, and the run ends FINISHED with every step once. (What the outage costs in training time is
    measured by bench/outage_cost.py, not asserted here.)"""
    client = MlflowClient(server.uri)
    epochs = 30  # about 15-30 s: the server is back well before the end
    disturbed = train_process(server.uri, tiny_dataset, "--epochs", str(epochs), "--out-dir", tmp_path, "--experiment",
                              "outage", "--run-name", "disturbed", pinned=True)  # fmt: skip
    seen: list[str] = []
    wait_for(disturbed, "=> epoch saved", seen)
    server.kill()
    for _ in range(3):  # three more epochs train while the server is down
        wait_for(disturbed, "=> epoch saved", seen)
    server.start()
    back_ms = time.time() * 1000
    seen += disturbed.stdout.readlines()
    assert disturbed.wait(timeout=600) == 0, "".join(seen)[-3000:]
    run = latest_run(client, "outage")
    assert_complete(client, run.info.run_id, epochs)
    logged_after = [m for m in client.get_metric_history(run.info.run_id, "val/acc1") if m.timestamp > back_ms]
    assert logged_after, "training ended before the server was back: the outage was not mid-training"
    journal = Journal(tmp_path / run.info.run_id)
    assert journal.delivered == len(journal.records)


def test_a_run_ending_during_an_outage_is_delivered_by_dlops_sync(server, tiny_dataset, tmp_path):
    client = MlflowClient(server.uri)
    process = train_process(server.uri, tiny_dataset, "--epochs", "3", "--out-dir", tmp_path, "--experiment",
                            "outage-sync", "--registered-model", "outage-sync", "--sync-timeout", "2")  # fmt: skip
    seen: list[str] = []
    wait_for(process, "=> epoch saved", seen)
    server.kill()
    seen += process.stdout.readlines()
    output = "".join(seen)
    assert process.wait(timeout=600) == 0, output[-3000:]  # the training succeeded
    run_dir = next(p for p in tmp_path.iterdir() if (p / "journal").is_dir())
    assert f"Deliver them with: dlops sync {run_dir}" in output and "records are kept" in output

    server.start()
    result = dlops(server.uri, "sync", tmp_path)  # a folder: every pending run under it
    assert result.returncode == 0, result.stderr[-3000:]
    assert_complete(client, run_dir.name, 3)
    versions = client.search_model_versions(f"run_id = '{run_dir.name}'")
    assert [v.name for v in versions] == ["outage-sync"]
    again = dlops(server.uri, "sync", run_dir)  # nothing left: nothing sent twice
    assert again.returncode == 0 and "nothing pending" in again.stdout
    assert_complete(client, run_dir.name, 3)


def test_a_killed_process_with_records_pending_is_resumed_without_loss_or_doubles(server, tiny_dataset, tmp_path):
    client = MlflowClient(server.uri)
    process = train_process(server.uri, tiny_dataset, "--epochs", "4", "--out-dir", tmp_path, "--experiment",
                            "outage-kill")  # fmt: skip
    seen: list[str] = []
    wait_for(process, "=> epoch saved", seen)
    server.kill()
    wait_for(process, "=> epoch saved", seen)  # epoch 2 exists only in the journal
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    run_dir = next(p for p in tmp_path.iterdir() if (p / "journal").is_dir())
    server.start()
    assert metric_steps(client, run_dir.name, "val/acc1") in ([], [1])
    result = dlops(server.uri, "train", "resnet", "--resume", run_dir / "last.pt", "-j", "0")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert_complete(client, run_dir.name, 4)


def test_offline_training_is_created_on_the_server_by_dlops_sync(tiny_dataset, tmp_path, client):
    env = {**os.environ, "DLOPS_OFFLINE": "1", "MLFLOW_TRACKING_URI": "http://127.0.0.1:9"}  # nothing there
    result = subprocess.run([sys.executable, "-m", "training.cli", "train", "resnet", str(tiny_dataset), *FAST,
                             "--epochs", "2", "--out-dir", str(tmp_path), "--experiment", "offline-run"],
                            env=env, cwd=REPO, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run_dir = next(p for p in tmp_path.iterdir() if (p / "journal").is_dir())
    assert f"deliver them with: dlops sync {run_dir}" in result.stdout
    result = subprocess.run([sys.executable, "-m", "training.cli", "sync", str(run_dir)], cwd=REPO,
                            capture_output=True, text=True, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    run = latest_run(client, "offline-run")
    assert run.data.tags["dlops_local_run_id"] == run_dir.name
    assert_complete(client, run.info.run_id, 2)


def test_an_unreachable_server_at_start_is_a_quick_clear_error(tiny_dataset, tmp_path):
    uri = f"http://127.0.0.1:{free_port()}"
    start = time.monotonic()
    result = dlops(uri, "train", "resnet", tiny_dataset, "--epochs", "1", *FAST, "--out-dir", tmp_path)
    elapsed = time.monotonic() - start
    assert result.returncode == 1
    assert f"the MLflow tracking server {uri} (MLFLOW_TRACKING_URI) is unreachable" in result.stderr
    assert "--offline" in result.stderr and elapsed < 40, elapsed


def test_three_processes_start_at_once_on_a_fresh_sqlite_store(tiny_dataset, tmp_path):
    uri = f"sqlite:///{tmp_path / 'fresh' / 'mlflow.db'}"
    (tmp_path / "fresh").mkdir()
    processes = [train_process(uri, tiny_dataset, "--epochs", "1", "--limit-train", "16", "--out-dir",
                               tmp_path / f"runs{i}", "--experiment", "concurrent") for i in range(3)]  # fmt: skip
    outputs = [p.communicate(timeout=600)[0] for p in processes]
    for process, output in zip(processes, outputs, strict=True):
        assert process.returncode == 0, output[-3000:]
    runs = MlflowClient(uri).search_runs([MlflowClient(uri).get_experiment_by_name("concurrent").experiment_id])
    assert len(runs) == 3 and all(r.info.status == "FINISHED" for r in runs)
