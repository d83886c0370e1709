"""Team setup: an MLflow server on a real PostgreSQL, the docker/ files, learning-curve pictures."""

from __future__ import annotations

import ast
import os
import re
import shutil
import signal
import subprocess
import sys
import urllib.parse
import uuid
from pathlib import Path

import psutil
import pytest
import yaml
from mlflow.tracking import MlflowClient

from tests.conftest import (
    REPO,
    artifact_paths,
    free_port,
    latest_run,
    metric_steps,
    run_cli,
    start_tracking_server,
    stop_process_group,
)
from training.jobs.lm.synthetic import write_synthetic_corpus

POSTGRES_URI = os.environ.get("DLOPS_TEST_POSTGRES_URI")
SESSION = uuid.uuid4().hex[:8]  # experiment names unique per test session: the database may be reused
FAST = ["-b", "16", "-j", "0", "-p", "0", "--lr", "0.02"]


ADMIN = ("admin", "postgres-admin-passphrase")
SERVERS: dict[str, dict] = {}  # the fixture's server process and state dir, by URL


def without_password(uri: str) -> str:
    parts = urllib.parse.urlsplit(uri)
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{parts.username}@{parts.hostname}:{parts.port}"))


def database_password() -> list[str]:
    """The password as the URI writes it and as it is."""
    encoded = urllib.parse.urlsplit(POSTGRES_URI).password
    return [encoded, urllib.parse.unquote(encoded)]


def test_the_database_password_is_in_no_command_line_and_no_output(mlflow_server, tmp_path):
    """The server's whole process tree (dlops, mlflow, uvicorn's workers) shows no password in its command
    line; the auth config that names the logins' database is owner-only; a sweep whose Optuna storage
    carries the password (given in $DLOPS_SWEEP_STORAGE) prints and logs it redacted."""
    server = psutil.Process(SERVERS[mlflow_server]["process"].pid)
    for process in (server, *server.children(recursive=True)):
        line = " ".join(process.cmdline())
        assert not [p for p in database_password() if p in line], line
    config = SERVERS[mlflow_server]["state"] / "basic_auth.ini"
    assert config.stat().st_mode & 0o777 == 0o600 and SERVERS[mlflow_server]["state"].stat().st_mode & 0o777 == 0o700

    corpus = write_synthetic_corpus(tmp_path / "corpus", 200, 30, 30)
    study = f"pg-secret-{SESSION}"
    result = subprocess.run(
        [sys.executable, "-m", "training.cli", "sweep", "lm", str(corpus), "--trials", "1", "--param",
         "lr=choice:5", "--study-name", study, "--", "--epochs", "1", "--emsize", "8", "--nhid", "8", "--nlayers", "1",
         "--bptt", "10", "--out-dir", str(tmp_path / "runs"), "--experiment", study],
        env={**os.environ, "MLFLOW_TRACKING_URI": mlflow_server, "DLOPS_SWEEP_STORAGE": POSTGRES_URI + "_optuna"},
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    said = result.stdout + result.stderr
    assert result.returncode == 0, said[-3000:]
    assert "dlops_ci:***@" in said and not [p for p in database_password() if p in said]
    parent = MlflowClient(mlflow_server).search_runs(
        [MlflowClient(mlflow_server).get_experiment_by_name(study).experiment_id], "tags.sweep_role = 'parent'"
    )[0]
    assert parent.data.params["storage"].startswith("postgresql://dlops_ci:***@")


@pytest.fixture(scope="module")
def mlflow_server(module_tmp):
    """`dlops tracking-server` (logins on) on the PostgreSQL database .ci/run prepared, the logins in
    that database too, artifacts proxied to a local folder."""
    if not POSTGRES_URI:
        pytest.skip("DLOPS_TEST_POSTGRES_URI is not set (.ci/run starts PostgreSQL and sets it)")
    port, root = free_port(), module_tmp.mktemp("mlflow-server")
    # the database's password in a secret file, the URI without it: neither shows in any command line
    password_file = root / "postgres_password"
    password_file.write_text(urllib.parse.unquote(urllib.parse.urlsplit(POSTGRES_URI).password) + "\n")
    server = start_tracking_server(
        root, "--backend-store-uri", without_password(POSTGRES_URI), "--database-password-file", password_file,
        "--artifacts-destination", root / "artifacts", "--port", port, "--workers", "1", "--state-dir", root / "auth",
        env={"MLFLOW_AUTH_ADMIN_PASSWORD": ADMIN[1]},
    )  # fmt: skip
    os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"] = ADMIN  # this module's clients
    SERVERS[f"http://127.0.0.1:{port}"] = {"process": server, "state": root / "auth"}
    yield f"http://127.0.0.1:{port}"
    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        os.environ.pop(name, None)
    stop_process_group(server)


def dlops(uri: str, *args, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "training.cli", *map(str, args)], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=600, **kwargs)  # fmt: skip


def test_resnet_and_lm_runs_through_a_postgres_backed_server(mlflow_server, tiny_dataset, tmp_path):
    client = MlflowClient(mlflow_server)
    result = dlops(mlflow_server, "train", "resnet", tiny_dataset, "--epochs", "2", *FAST, "--out-dir", tmp_path,
                   "--experiment", f"pg-resnet-{SESSION}", "--registered-model", "pg-resnet")  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run = latest_run(client, f"pg-resnet-{SESSION}")
    assert run.data.params["epochs"] == "2" and run.data.params["arch"] == "resnet18"
    assert metric_steps(client, run.info.run_id, "val/acc1") == [1, 2]
    artifacts = set(artifact_paths(client, run.info.run_id))
    assert {"checkpoints/best.pt", "checkpoints/last.pt", "learning_curves.png", "model_summary.txt"} <= artifacts
    assert run.info.artifact_uri.startswith("mlflow-artifacts:"), "artifacts go through the server"
    assert [v.name for v in client.search_model_versions(f"run_id = '{run.info.run_id}'")] == ["pg-resnet"]

    # a .mar built from the registry version, logged back to the run through the server
    version = client.search_model_versions(f"run_id = '{run.info.run_id}'")[0].version
    result = dlops(mlflow_server, "package", "resnet", "--model-uri", f"models:/pg-resnet/{version}",
                   "--model-store", tmp_path / "store")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"serving/resnet-{version}.mar" in artifact_paths(client, run.info.run_id)
    assert client.get_model_version("pg-resnet", version).tags["mar"].endswith(f"serving/resnet-{version}.mar")
    # the registered version is an MLflow model whose files come through the server's artifact proxy
    script = (f"import mlflow; m = mlflow.pyfunc.load_model('models:/pg-resnet/{version}'); "
              "print(m.metadata.signature.inputs.input_names())")  # fmt: skip
    loaded = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "MLFLOW_TRACKING_URI": mlflow_server})  # fmt: skip
    assert loaded.returncode == 0 and "['image', 'topk']" in loaded.stdout, loaded.stderr[-3000:]

    corpus = write_synthetic_corpus(tmp_path / "corpus", 200, 30, 30)
    result = dlops(mlflow_server, "train", "lm", corpus, "--epochs", "2", "--emsize", "16", "--nhid", "16",
                   "--nlayers", "1", "--bptt", "20", "--log-interval", "10", "--out-dir", tmp_path,
                   "--experiment", f"pg-lm-{SESSION}", "--registered-model", "pg-lm")  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    lm = latest_run(client, f"pg-lm-{SESSION}")
    assert metric_steps(client, lm.info.run_id, "val/ppl") == [1, 2]
    assert len(metric_steps(client, lm.info.run_id, "train/loss")) >= 2
    assert "checkpoints/best.pt" in artifact_paths(client, lm.info.run_id)
    assert [v.name for v in client.search_model_versions(f"run_id = '{lm.info.run_id}'")] == ["pg-lm"]


def test_resume_after_sigkill_continues_the_server_side_run(mlflow_server, tiny_dataset, tmp_path):
    client = MlflowClient(mlflow_server)
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "training.cli", "train", "resnet", str(tiny_dataset), "--epochs", "3", *FAST,
         "--out-dir", str(tmp_path), "--experiment", f"pg-resume-{SESSION}"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO,
    )  # fmt: skip
    for line in proc.stdout:
        if line.startswith("=> epoch saved"):
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=60)
    run = latest_run(client, f"pg-resume-{SESSION}")
    assert run.info.status == "RUNNING"
    result = dlops(mlflow_server, "train", "resnet", "--resume", tmp_path / run.info.run_id / "last.pt", "-j", "0")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    resumed = client.get_run(run.info.run_id)
    assert resumed.info.status == "FINISHED"
    assert metric_steps(client, run.info.run_id, "val/acc1") == [1, 2, 3]
    assert len(client.search_runs([run.info.experiment_id])) == 1


def test_learning_curve_picture_is_logged(tiny_dataset, tmp_path, client):
    run_cli("train", "resnet", tiny_dataset, "--epochs", "2", *FAST, "--out-dir", tmp_path,
            "--experiment", "test-curves")  # fmt: skip
    run = latest_run(client, "test-curves")
    assert "learning_curves.png" in artifact_paths(client, run.info.run_id)
    picture = Path(client.download_artifacts(run.info.run_id, "learning_curves.png", str(tmp_path)))
    from PIL import Image

    with Image.open(picture) as image:
        assert image.format == "PNG" and image.width >= 800 and image.height >= 300
    assert picture.stat().st_size > 20_000


@pytest.mark.parametrize(
    "dockerfile", ["docker/Dockerfile.train", "docker/Dockerfile.serve", "docker/Dockerfile.postgres"]
)
def test_dockerfiles_pass_hadolint(dockerfile):
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))
    result = subprocess.run([hadolint, "--failure-threshold", "info", str(REPO / dockerfile)],
                            capture_output=True, text=True)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_serving_image_copies_every_module_its_entry_point_imports():
    """Dockerfile.serve copies serving/ file by file (no training code in the image): a module the
    container's entry point comes to import, and the COPY line lacks, breaks the container only."""
    from tests.test_layers import PACKAGES

    def imported_files(path: Path) -> set[str]:
        """The project's files a module imports: `from serving import environment` is serving/environment.py."""
        found = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            modules = [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
            for module in modules:
                file, package = REPO / (module.replace(".", "/") + ".py"), REPO / module.replace(".", "/")
                if module.split(".")[0] in PACKAGES:
                    found |= {str(f.relative_to(REPO)) for f in (file, package / "__init__.py") if f.is_file()}
        return found

    copied = {word for line in (REPO / "docker" / "Dockerfile.serve").read_text().splitlines()
              for word in line.replace("\\", " ").split() if word.startswith("serving/")}  # fmt: skip
    needed, todo = set(), ["serving/container.py"]
    while todo:
        file = todo.pop()
        if file not in needed:
            needed.add(file)
            todo += imported_files(REPO / file)
    assert all(f.startswith("serving/") for f in needed), f"the serving image has no training code: {needed}"
    assert needed <= copied, f"not copied into the image: {sorted(needed - copied)}"


def test_compose_file_names_the_services_volumes_and_ports():
    compose = yaml.safe_load((REPO / "docker" / "compose.yaml").read_text())
    services = compose["services"]
    fleet = {"fleet-1", "fleet-2", "gateway", "controller"}
    nodes = {"trainer-0", "trainer-1"}
    assert set(services) == {"postgres", "mlflow", "trainer", "torchserve", "prometheus", "client", *fleet, *nodes}
    # two training nodes: the same command, a rendezvous at trainer-0 (its hostname), one shared runs volume
    for name in nodes:
        node = services[name]
        assert node["hostname"] == name and node["profiles"] == ["nodes"] and "runs:/home/dlops/work/runs" in node[
            "volumes"]  # fmt: skip
        assert "--nnodes 2 --rdzv-endpoint trainer-0:29500" in node["command"][0]
        assert node["environment"]["MLFLOW_TRACKING_URI"] == "https://mlflow:5000"
    assert set(compose["volumes"]) == {"pgdata", "mlflow-artifacts", "runs", "prometheus-data"}
    # Prometheus scrapes TorchServe over TLS with the stack's CA, on the host's loopback only, with the rules
    prometheus = services["prometheus"]
    assert prometheus["ports"] == ["127.0.0.1:9090:9090"] and prometheus["secrets"] == ["tls_ca"]
    scrape = yaml.safe_load((REPO / "docker" / "prometheus.yml").read_text())["scrape_configs"][0]
    assert scrape["scheme"] == "https" and scrape["tls_config"]["ca_file"] == "/run/secrets/tls_ca"
    assert "../monitoring/rules.yml:/etc/dlops/rules.yml:ro" in prometheus["volumes"]
    assert "pgdata:/var/lib/postgresql/data" in services["postgres"]["volumes"]
    assert any(v.startswith("mlflow-artifacts:") for v in services["mlflow"]["volumes"])
    # the host reads the server's keys and ports, and writes archives, through bind mounts
    mounts = {v.rsplit(":", 1)[1] for v in services["torchserve"]["volumes"]}
    assert mounts == {"/home/model-server/state", "/home/model-server/model-store"}
    # MLflow and inference are published on loopback unless BIND_ADDRESS says otherwise; management never
    assert services["mlflow"]["ports"] == ["${BIND_ADDRESS:-127.0.0.1}:5000:5000"]
    assert services["torchserve"]["ports"] == ["${BIND_ADDRESS:-127.0.0.1}:8080:8080", "127.0.0.1:8081:8081",
                                               "${METRICS_BIND_ADDRESS:-127.0.0.1}:8082:8082"]  # fmt: skip
    # the tracking server runs with logins and TLS, its admin's and the database's passwords secret files,
    # never a default, never in a command line; PostgreSQL on a network only the tracking server joins
    command = services["mlflow"]["command"]
    assert command[0] == "tracking-server" and "postgresql://mlflow@postgres:5432/mlflow" in command
    assert command[command.index("--admin-password-file") + 1] == "/run/secrets/mlflow_admin_password"
    assert command[command.index("--database-password-file") + 1] == "/run/secrets/postgres_password"
    assert command[command.index("--tls-cert") + 1] == "/run/secrets/tls_cert"
    assert set(services["mlflow"]["secrets"]) == {"mlflow_admin_password", "postgres_password", "tls_cert",
                                                  "tls_key", "tls_ca"}  # fmt: skip
    postgres = services["postgres"]
    assert postgres["environment"]["POSTGRES_PASSWORD_FILE"] == "/run/secrets/postgres_password"
    assert "POSTGRES_PASSWORD" not in postgres["environment"] and ":-" not in compose["secrets"]["postgres_password"]
    assert compose["networks"]["database"]["internal"] is True and postgres["networks"] == ["database"]
    assert [n for n, s in services.items() if "database" in s.get("networks", [])] == ["postgres", "mlflow"]
    assert services["mlflow"]["environment"]["MLFLOW_ALLOWED_HOSTS"].startswith("mlflow,")
    assert "deploy" not in services["trainer"], "GPUs are reserved by compose.gpu.yaml only, where there are GPUs"
    gpu = yaml.safe_load((REPO / "docker" / "compose.gpu.yaml").read_text())["services"]["trainer"]
    device = gpu["deploy"]["resources"]["reservations"]["devices"][0]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    for name in ("trainer", "client"):
        environment = services[name]["environment"]
        assert environment["MLFLOW_TRACKING_URI"] == "https://mlflow:5000"
        assert environment["MLFLOW_TRACKING_SERVER_CERT_PATH"] == "/run/secrets/tls_ca"
        assert {"MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"} <= set(environment), name
    assert services["client"]["environment"]["DLOPS_INFERENCE_URL"] == "https://torchserve:8080"
    assert services["torchserve"]["environment"]["DLOPS_SERVE_TLS_CERT"] == "/run/secrets/tls_cert"
    assert "healthcheck" in services["mlflow"] and "healthcheck" in services["postgres"]
    # a fleet: servers without any network (their APIs are sockets in the shared folder), the gateway published
    # on loopback unless BIND_ADDRESS says otherwise, TLS ending there; the folders at the host's own paths
    for name in ("fleet-1", "fleet-2"):
        assert services[name]["network_mode"] == "none" and "ports" not in services[name]
    assert services["gateway"]["ports"] == ["${BIND_ADDRESS:-127.0.0.1}:8090:8090"]
    assert services["gateway"]["environment"]["DLOPS_SERVE_TLS_CERT"] == "/run/secrets/tls_cert"
    assert services["controller"]["command"][:3] == ["fleet", "follow", "champion"]
    for name in fleet:
        assert all(a + "}" == b for a, b in (v.split("}:", 1) for v in services[name]["volumes"])), name
    for name, service in services.items():
        for dependency in service.get("depends_on", {}):
            assert dependency in services, f"{name} depends on unknown {dependency}"


def requirements(path: Path) -> dict[str, list[str]]:
    """{name==version: [hashes]} of a pip-compile lock file."""
    found: dict[str, list[str]] = {}
    current = None
    for line in path.read_text().splitlines():
        if re.match(r"^[A-Za-z0-9]", line):
            current = line.split()[0].lower().replace("_", "-")
            found[current] = []
        elif "--hash=sha256:" in line and current:
            found[current].append(line.split("--hash=sha256:")[1].split()[0])
    return found


def test_every_install_checks_hashes_and_every_base_image_is_pinned():
    """requirements.lock carries a hash for every package it pins (all of requirements.in's pins), the
    serving image's lock is a subset at the same versions, every pip install of the Makefile and the
    images requires hashes (or installs this project from its folder), and the base images are pinned
    by digest, the same in the Dockerfiles, compose and docker_check."""
    lock = requirements(REPO / "requirements.lock")
    assert lock and all(len(hashes) >= 1 for hashes in lock.values()), [p for p, h in lock.items() if not h]
    pins = {line.split()[0].lower().replace("_", "-") for line in (REPO / "requirements.in").read_text().splitlines()
            if re.match(r"^[A-Za-z0-9]", line)}  # fmt: skip
    assert pins <= set(lock), sorted(pins - set(lock))
    serve = requirements(REPO / "docker" / "serve.lock")
    assert serve and set(serve) <= set(lock) and all(serve.values())
    joined = [(REPO / p).read_text().replace("\\\n", " ") for p in ("Makefile", "docker/Dockerfile.train",
                                                                     "docker/Dockerfile.serve")]  # fmt: skip
    installs = [line for text in joined for line in text.splitlines() if "pip install" in line]
    assert installs and all("--require-hashes" in line or "--no-deps" in line for line in installs), installs
    from scripts.docker_check import OFFICIAL

    compose = (REPO / "docker" / "compose.yaml").read_text()
    for image in OFFICIAL.values():
        assert re.search(r"@sha256:[0-9a-f]{64}$", image), image
        assert image in compose
    for dockerfile in ("Dockerfile.train", "Dockerfile.serve"):
        assert f"ARG BASE={OFFICIAL['python']}" in (REPO / "docker" / dockerfile).read_text()
