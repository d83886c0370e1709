"""Nothing trusted blindly, nothing leaked, against the real components: model sources checked before
any download and checkpoints against the digest recorded at registration; run folders that are
data, not instructions; child processes without the user's secrets and state that only its owner
reads; TLS on every server that leaves loopback (each test's traffic stays on 127.0.0.1)."""

from __future__ import annotations

import http.client
import os
import shutil
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest
from mlflow.tracking import MlflowClient

from serving.client import ServerClient
from serving.keys import read_keys
from serving.server import ServeError, ServeOptions, running_pid, start, stop
from serving.tls import certificate_names, machine_hosts, stack_certificates
from tests.conftest import (
    REPO,
    Listener,
    artifact_paths,
    free_port,
    latest_run,
    start_tracking_server,
    stop_process_group,
)
from training.checkpoint import file_sha256
from training.tracking import Journal, records
from training.tracking.registry import checkpoint_location
from training.tracking.server import ServerSetupError, TrackingServer, presented_tls
from training.tracking.sources import ForeignSource, artifact_stores, check_location
from training.tracking.store import store_client
from training.tracking.tags import CHECKPOINT_DIGEST

FAST = ["--epochs", "1", "-b", "8", "-j", "0", "-p", "0", "--lr", "0.02"]
# what a deployer's environment holds: none of it may reach a planted URL, TorchServe or MLflow's server
SECRETS = {"MLFLOW_TRACKING_USERNAME": "deployer", "MLFLOW_TRACKING_PASSWORD": "deployer-secret-pw",
           "AWS_SECRET_ACCESS_KEY": "aws-secret-access-key-value"}  # fmt: skip
JAVA = shutil.which("java") is not None


def dlops(*args, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    environment = {**os.environ, **SECRETS, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "training.cli", *map(str, args)], env=environment, cwd=REPO,
                          capture_output=True, text=True, timeout=600)  # fmt: skip


def mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def secrets_in(process: psutil.Process) -> list[str]:
    """Which SECRETS values a process has in its command line or environment."""
    text = (
        "\0".join(process.cmdline()) + "\0" + Path(f"/proc/{process.pid}/environ").read_bytes().decode(errors="replace")
    )
    return [value for value in SECRETS.values() if value in text]


# --- model sources and checkpoints ------------------------------------------------------------------------


def test_a_version_from_a_foreign_source_is_refused_before_any_download(client, tmp_path):
    """Versions planted in the store (a client-side store accepts any source): one pointing at an HTTP
    listener, one at somebody's bucket, one whose MLflow model lives at the listener. `dlops package` and
    `dlops deploy` refuse each by name before a single request, the deployer's login in their environment."""
    with Listener() as listener:
        client.create_registered_model("evil")
        versions = {
            client.create_model_version("evil", source=f"{listener.url}/api/2.0/mlflow-artifacts/artifacts/e/best.pt"
                                        ).version: listener.url.removeprefix("http://"),
            client.create_model_version("evil", source="s3://someone-elses-bucket/e/best.pt").version: "s3",
        }  # fmt: skip
        experiment = client.create_experiment("evil-models", artifact_location=f"{listener.url}/artifacts")
        logged = client.create_logged_model(experiment, name="model")
        planted = client.create_model_version("evil", source=f"models:/{logged.model_id}", model_id=logged.model_id)
        versions[planted.version] = listener.url.removeprefix("http://")
        for version, where in versions.items():
            uri = f"models:/evil/{version}"
            store = ["--model-store", tmp_path / "store"]
            for command in (["package", "resnet", "--model-uri", uri, *store],
                            ["deploy", uri, *store, "--state-dir", tmp_path / "ts"]):  # fmt: skip
                result = dlops(*command)
                assert result.returncode == 1, result.stdout + result.stderr
                assert f"model version evil/{version}" in result.stderr and where in result.stderr, result.stderr
                assert "Nothing was downloaded" in result.stderr
        assert listener.requests == [], "a request reached the planted source"


def test_trusted_stores_are_prefixes_that_no_lookalike_passes():
    stores = artifact_stores(["s3://team-bucket"])
    assert stores == ["s3://team-bucket/"]
    check_location("s3://team-bucket/models/best.pt", tracking_uri="http://127.0.0.1:5000", version="m/1",
                   stores=stores)  # fmt: skip
    check_location("mlflow-artifacts:/1/abc/artifacts/best.pt", tracking_uri="http://127.0.0.1:5000", version="m/1",
                   stores=[])  # fmt: skip
    for foreign in ("s3://team-bucket-of-someone/best.pt", "mlflow-artifacts://10.9.9.9:5000/1/best.pt",
                    "https://127.0.0.1:5000/best.pt", "/etc/passwd"):  # fmt: skip
        with pytest.raises(ForeignSource, match="model version m/1"):
            check_location(foreign, tracking_uri="http://127.0.0.1:5000", version="m/1", stores=stores)


def test_a_checkpoint_changed_after_registration_is_refused(tiny_dataset, client, tmp_path):
    dlops("train", "resnet", tiny_dataset, *FAST, "--out-dir", tmp_path / "runs", "--experiment", "trust-digest",
          "--registered-model", "trust-digest")  # fmt: skip
    (version,) = client.search_model_versions("name = 'trust-digest'")
    stored = Path(checkpoint_location(version, client).removeprefix("file://"))
    assert version.tags[CHECKPOINT_DIGEST] == file_sha256(stored), "recorded when registered"
    packaged = dlops("package", "resnet", "--model-uri", "models:/trust-digest/1", "--model-store", tmp_path / "a")
    assert packaged.returncode == 0, packaged.stdout + packaged.stderr
    with stored.open("ab") as tampered:  # what someone with write access to the artifact store could do
        tampered.write(b"\0")
    refused = dlops("package", "resnet", "--model-uri", "models:/trust-digest/1", "--model-store", tmp_path / "b")
    assert refused.returncode == 1 and "recorded when it was registered" in refused.stderr, refused.stderr
    assert not list((tmp_path / "b").glob("*.mar"))


# --- run folders are data ----------------------------------------------------------------------------------


def test_a_planted_run_folder_is_not_sent_to_the_server_it_names(tmp_path):
    with Listener() as listener:
        planted = Journal(tmp_path / "runs" / "planted")
        planted.update_state(run_id="0123456789abcdef", experiment="x", tracking_uri=listener.url)
        planted.append(records.Metrics(metrics={"loss": 1.0}, step=1))
        planted.close()
        result = dlops("sync", tmp_path / "runs")
        assert result.returncode == 1 and "not sent" in result.stdout and listener.url in result.stdout, result
        assert listener.requests == [], "the login went where the folder said"
    assert Journal(tmp_path / "runs" / "planted").pending == 1, "kept, not dropped"


def test_sync_uploads_only_files_inside_the_run_folder(tmp_path, client):
    secret = tmp_path / "runs" / "outside" / "id_rsa"
    secret.parent.mkdir(parents=True)
    secret.write_text("PRIVATE KEY")
    run_dir = tmp_path / "runs" / "offline-run"
    journal = Journal(run_dir)
    journal.update_state(run_id=None, local_id="trust-local-1", experiment="trust-sync")
    journal.append(records.CreateRun(experiment="trust-sync", run_name="planted", local_id="trust-local-1"))
    (run_dir / "notes.txt").write_text("the run's own file")
    journal.append(records.Artifact(path=str(run_dir / "notes.txt")))
    journal.append(records.Artifact(path=str(secret)))
    journal.append(records.Text(spool="../../../outside/id_rsa", artifact_file="stolen.txt"))
    journal.append(records.End(status="FINISHED"))
    journal.close()
    result = dlops("sync", run_dir)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("outside the run folder: not uploaded") == 2, result.stdout
    run = latest_run(client, "trust-sync")
    assert artifact_paths(client, run.info.run_id) == ["notes.txt"]


# --- child processes and files ------------------------------------------------------------------------------


@pytest.mark.skipif(not JAVA, reason="TorchServe needs Java (.ci/run installs it)")
def test_torchserve_gets_no_secret_and_its_state_is_its_owners(tmp_path, monkeypatch):
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    (tmp_path / "store").mkdir()
    options = ServeOptions.on_free_ports(model_store=tmp_path / "store", state_dir=tmp_path / "ts")
    start(options, [], allow_empty=True)
    try:
        server = psutil.Process(running_pid(tmp_path / "ts"))
        keeper = psutil.Process(int((tmp_path / "ts" / "keeper.pid").read_text()))
        for process in (server, *server.children(recursive=True), keeper):
            assert secrets_in(process) == [], f"{process.name()} ({process.pid})"
        assert mode(tmp_path / "ts") == 0o700
        assert mode(tmp_path / "ts" / "key_file.json") == 0o600
    finally:
        stop(tmp_path / "ts")


def test_a_local_store_is_its_owners(tracking_store):
    store_client()  # what every dlops command opens the store with
    database = Path(tracking_store.removeprefix("sqlite:///"))
    assert mode(database) == 0o600 and mode(database.parent / "artifacts") == 0o700


# --- TLS ----------------------------------------------------------------------------------------------------


@pytest.mark.skipif(not JAVA, reason="TorchServe needs Java (.ci/run installs it)")
def test_torchserve_over_tls_answers_a_client_that_trusts_the_stack_ca_and_refuses_plain_http(tmp_path):
    files = stack_certificates(tmp_path / "tls", certificate_names(machine=False))
    (tmp_path / "store").mkdir()
    plain = ServeOptions.on_free_ports(model_store=tmp_path / "store", state_dir=tmp_path / "plain",
                                       inference_address="0.0.0.0")  # fmt: skip
    with pytest.raises(ServeError, match="--insecure-http"):
        start(plain, [], allow_empty=True)  # published without TLS: refused before anything starts
    options = ServeOptions.on_free_ports(model_store=tmp_path / "store", state_dir=tmp_path / "ts",
                                         tls_cert=files.cert, tls_key=files.key, tls_ca=files.ca)  # fmt: skip
    start(options, [], allow_empty=True)
    try:
        local = ServerClient.of(tmp_path / "ts")
        assert local.urls["inference"].startswith("https://") and local.call("inference", "GET", "/ping").ok
        key = read_keys(tmp_path / "ts")["inference"].value
        port = options.inference_port
        teammate = ServerClient.remote(f"https://127.0.0.1:{port}", key, cafile=files.ca)
        assert teammate.call("inference", "GET", "/ping").ok
        with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
            ServerClient.remote(f"https://127.0.0.1:{port}", key, cafile=None).call("inference", "GET", "/ping")
        with pytest.raises(urllib.error.HTTPError) as plain:  # TorchServe answers plain HTTP with a refusal only
            urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=10)
        assert plain.value.code == 403 and b"only accepts HTTPS" in plain.value.read()
    finally:
        stop(tmp_path / "ts")


def test_off_loopback_the_tracking_server_wants_tls_unless_told(tmp_path):
    public = TrackingServer(backend_store_uri="sqlite:///x.db", artifacts_destination="a", host="0.0.0.0",
                            state_dir=tmp_path)  # fmt: skip
    with pytest.raises(ServerSetupError, match="--insecure-http on purpose"):
        presented_tls(public, ["localhost"])
    insecure = TrackingServer(backend_store_uri="sqlite:///x.db", artifacts_destination="a", host="0.0.0.0",
                              state_dir=tmp_path, insecure_http=True)  # fmt: skip
    assert presented_tls(insecure, ["localhost"]) is None
    auto = TrackingServer(backend_store_uri="sqlite:///x.db", artifacts_destination="a", host="0.0.0.0",
                          state_dir=tmp_path, tls="auto")  # fmt: skip
    made = presented_tls(auto, ["localhost", "127.0.0.1", "teammates.example:5000"])
    assert made.ca == tmp_path / "tls" / "ca.pem" and mode(tmp_path / "tls" / "ca.key") == 0o600


@pytest.fixture(scope="module")
def tls_server(module_tmp):
    """`dlops tracking-server --tls auto` on loopback, the admin's password in its environment."""
    root, port = module_tmp.mktemp("tls-server"), free_port()
    process = start_tracking_server(
        root, "--port", port, "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination",
        root / "artifacts", "--workers", "1", "--state-dir", root / "auth", "--tls", "auto",
        env={**SECRETS, "MLFLOW_AUTH_ADMIN_PASSWORD": "tls-admin-passphrase-1"},
    )  # fmt: skip
    yield {"url": f"https://127.0.0.1:{port}", "ca": root / "auth" / "tls" / "ca.pem", "root": root,
           "process": psutil.Process(process.pid), "log": root / "server.log"}  # fmt: skip
    stop_process_group(process)


def test_the_tracking_server_over_tls_serves_a_client_that_trusts_its_ca(tls_server, tiny_dataset, tmp_path):
    said = tls_server["log"].read_text()
    assert f"teammates trust {tls_server['ca']}" in said
    context = ssl.create_default_context(cafile=str(tls_server["ca"]))
    with urllib.request.urlopen(f"{tls_server['url']}/health", timeout=10, context=context) as answer:
        assert answer.status == 200
    with pytest.raises((OSError, http.client.HTTPException)):
        urllib.request.urlopen(tls_server["url"].replace("https://", "http://") + "/health", timeout=10)
    login = {"MLFLOW_TRACKING_URI": tls_server["url"], "MLFLOW_TRACKING_USERNAME": "admin",
             "MLFLOW_TRACKING_PASSWORD": "tls-admin-passphrase-1"}  # fmt: skip
    refused = dlops("train", "resnet", tiny_dataset, *FAST, "--out-dir", tmp_path, env=login)
    assert refused.returncode == 1 and "does not trust" in refused.stderr, refused.stderr
    trained = dlops("train", "resnet", tiny_dataset, *FAST, "--out-dir", tmp_path, "--experiment", "over-tls",
                    env={**login, "MLFLOW_TRACKING_SERVER_CERT_PATH": str(tls_server["ca"])})  # fmt: skip
    assert trained.returncode == 0, trained.stdout[-2000:] + trained.stderr[-2000:]
    client_settings = {"MLFLOW_TRACKING_USERNAME": "admin", "MLFLOW_TRACKING_PASSWORD": "tls-admin-passphrase-1",
                       "MLFLOW_TRACKING_SERVER_CERT_PATH": str(tls_server["ca"])}  # fmt: skip
    os.environ.update(client_settings)  # MLflow's client reads them at each request
    try:
        assert latest_run(MlflowClient(tls_server["url"]), "over-tls").info.status == "FINISHED"
    finally:
        for name in client_settings:
            os.environ.pop(name, None)


def test_the_tracking_servers_secrets_stay_out_of_sight(tls_server):
    auth = tls_server["root"] / "auth"
    assert mode(auth) == 0o700 and mode(auth / "basic_auth.ini") == 0o600
    assert mode(auth / "tls" / "ca.key") == 0o600 and mode(auth / "tls" / "server.key") == 0o600
    for process in (tls_server["process"], *tls_server["process"].children(recursive=True)):
        text = "\0".join(process.cmdline())
        assert "tls-admin-passphrase-1" not in text, process.cmdline()
        environ = Path(f"/proc/{process.pid}/environ").read_bytes().decode(errors="replace")
        if process.pid != tls_server["process"].pid:  # dlops itself was started with them; MLflow gets none
            assert (
                SECRETS["MLFLOW_TRACKING_PASSWORD"] not in environ and SECRETS["AWS_SECRET_ACCESS_KEY"] not in environ
            )


def test_a_key_is_not_sent_in_clear_to_another_machine(tiny_dataset):
    """An http:// --url off loopback with a key is refused before any request (this machine's own
    non-loopback address stands for another machine; nothing listens on the port)."""
    address = next(h for h in machine_hosts() if h[0].isdigit() and not h.startswith("127."))
    image = next((tiny_dataset / "val" / "images").iterdir())
    url = f"http://{address}:{free_port()}"
    refused = dlops("predict", image, "--url", url, "--key", "k")
    assert refused.returncode == 2 and "--insecure-http" in refused.stderr, refused.stderr
    tried = dlops("predict", image, "--url", url, "--key", "k", "--insecure-http")
    assert tried.returncode == 1 and "--insecure-http" not in tried.stderr, tried.stderr  # it tried: nothing listens
