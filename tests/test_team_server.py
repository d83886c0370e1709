"""A team's tracking server: `dlops tracking-server` (MLflow's basic-auth app) on loopback, teammates with
read or edit rights, refused logins that stop a run before it trains, refusals the sender does not
retry, and the Host headers a teammate's machine sends (the traffic itself stays on 127.0.0.1)."""

from __future__ import annotations

import base64
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from tests.conftest import REPO, free_port, latest_run, metric_steps, start_tracking_server, stop_process_group
from training.tracking import Journal
from training.tracking.sender import Delivery, Sender
from training.tracking.server import ServerSetupError, TrackingServer, admin_password, machine_hosts

ADMIN = ("admin", "team-admin-passphrase-1")
FAST = ["-b", "8", "-j", "0", "-p", "0", "--lr", "0.02"]


def dlops(uri: str, login: tuple[str, str] | None, *args, **kwargs) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING_")}
    env.update({"MLFLOW_TRACKING_URI": uri, "PYTHONUNBUFFERED": "1"})
    if login:
        env["MLFLOW_TRACKING_USERNAME"], env["MLFLOW_TRACKING_PASSWORD"] = login
    return subprocess.run([sys.executable, "-m", "training.cli", *map(str, args)], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=600, **kwargs)  # fmt: skip


def http(url: str, login: tuple[str, str] | None = None, host: str | None = None, body: bytes | None = None):
    """(status, text) of one request to the server on 127.0.0.1, with a Host header of our choosing."""
    headers = {"Content-Type": "application/json"}
    if login:
        headers["Authorization"] = "Basic " + base64.b64encode(":".join(login).encode()).decode()
    if host:
        headers["Host"] = host
    request = urllib.request.Request(url, data=body, headers=headers, method="POST" if body else "GET")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


@pytest.fixture(scope="module")
def team_server(module_tmp):
    """`dlops tracking-server` on 127.0.0.1 that also answers to this machine's names (--allowed-hosts machine)."""
    root, port = module_tmp.mktemp("team-server"), free_port()
    process = start_tracking_server(
        root, "--host", "127.0.0.1", "--port", port, "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
        "--artifacts-destination", root / "artifacts", "--workers", "1", "--state-dir", root / "auth",
        "--allowed-hosts", "machine", "--artifact-store", "s3://team-bucket/models",
        env={"MLFLOW_AUTH_ADMIN_PASSWORD": ADMIN[1]},
    )  # fmt: skip
    yield f"http://127.0.0.1:{port}"
    stop_process_group(process)


@pytest.fixture(scope="module")
def teammates(team_server):
    """alice reads, bob edits: created by the admin with `dlops users add`."""
    logins = {}
    for name, role in (("alice", "reader"), ("bob", "editor")):
        result = dlops(team_server, ADMIN, "users", "add", name, "--role", role)
        assert result.returncode == 0, result.stdout + result.stderr
        password = result.stdout.split("password (shown once; hand it over privately): ")[1].strip()
        logins[name] = (name, password)
    return logins


def search_body() -> bytes:
    return b'{"max_results": 1}'


def test_no_credentials_get_401_and_the_admin_gets_in(team_server):
    url = f"{team_server}/api/2.0/mlflow/experiments/search"
    assert http(url, body=search_body())[0] == 401
    assert http(url, login=("admin", "not-the-password"), body=search_body())[0] == 401
    assert http(url, login=ADMIN, body=search_body())[0] == 200


def test_an_editor_trains_and_a_reader_reads_but_neither_deletes(team_server, teammates, tiny_dataset, tmp_path):
    bob, alice = teammates["bob"], teammates["alice"]
    client_as(team_server, ADMIN).create_experiment("team-resnet")  # the team's experiment: bob did not create it
    result = dlops(team_server, bob, "train", "resnet", tiny_dataset, "--epochs", "2", *FAST, "--out-dir", tmp_path,
                   "--experiment", "team-resnet", "--registered-model", "team-resnet")  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    admin = client_as(team_server, ADMIN)
    run = latest_run(admin, "team-resnet")
    assert run.info.status == "FINISHED" and metric_steps(admin, run.info.run_id, "val/acc1") == [1, 2]
    assert run.data.tags["mlflow.user"] == "bob", "the run list shows who started it"
    assert [v.name for v in admin.search_model_versions(f"run_id = '{run.info.run_id}'")] == ["team-resnet"]

    reader = client_as(team_server, alice)
    assert [r.info.run_id for r in reader.search_runs([run.info.experiment_id])] == [run.info.run_id]
    for login in (alice, bob):
        with pytest.raises(MlflowException) as refused:
            client_as(team_server, login).delete_run(run.info.run_id)
        assert refused.value.get_http_status_code() == 403
    with pytest.raises(MlflowException) as refused:
        client_as(team_server, alice).set_registered_model_alias("team-resnet", "champion", "1")
    assert refused.value.get_http_status_code() == 403, "a reader cannot move the alias that decides what serves"
    assert admin.get_run(run.info.run_id).info.lifecycle_stage == "active"


def client_as(uri: str, login: tuple[str, str]) -> MlflowClient:
    """A client whose requests carry `login` (MLflow reads the variables at each request)."""
    os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"] = login
    return MlflowClient(uri)


@pytest.fixture(autouse=True)
def _forget_login():
    yield
    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        os.environ.pop(name, None)


def test_a_wrong_password_stops_the_run_before_it_trains(team_server, teammates, tiny_dataset, tmp_path):
    result = dlops(team_server, ("bob", "wrong-password"), "train", "resnet", tiny_dataset, "--epochs", "1", *FAST,
                   "--out-dir", tmp_path, "--experiment", "team-refused")  # fmt: skip
    said = result.stdout + result.stderr
    assert result.returncode == 1, said
    assert "HTTP 401" in said and "You are not authenticated" in said, "the server's answer"
    assert "MLFLOW_TRACKING_PASSWORD" in said, "what to set"
    assert "Epoch: [1]" not in said and not list(tmp_path.glob("*/last.pt")), "no step was trained"


def test_a_refusal_is_reported_once_and_the_records_wait_for_sync(team_server, teammates, tiny_dataset, tmp_path):
    """An offline run delivered by a reader (no right to create runs there) is refused: `dlops sync` says
    so and keeps every record; the sender gives up at once instead of retrying forever; an editor's
    sync then delivers the run."""
    client_as(team_server, ADMIN).create_experiment("team-offline")
    result = dlops(team_server, None, "train", "resnet", tiny_dataset, "--epochs", "1", *FAST, "--out-dir", tmp_path,
                   "--experiment", "team-offline", "--offline")  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:]
    (run_dir,) = [p.parent.parent for p in tmp_path.glob("*/journal/records.jsonl")]
    pending = Journal(run_dir).pending
    assert pending > 10

    refused = dlops(team_server, teammates["alice"], "sync", run_dir)
    assert refused.returncode == 1 and "HTTP 403" in refused.stderr and "set-role alice --role editor" in refused.stderr
    assert Journal(run_dir).pending == pending, "nothing delivered, nothing dropped"

    client_as(team_server, teammates["alice"])
    sender = Sender(Delivery(Journal(run_dir), team_server))
    started = time.monotonic()
    sender.start()
    sender.join(timeout=30)
    assert not sender.is_alive(), "a refusal ends the sender: it does not retry"
    assert sender.refused is not None and "HTTP 403" in str(sender.refused)
    assert time.monotonic() - started < 30 and Journal(run_dir).pending == pending

    delivered = dlops(team_server, teammates["bob"], "sync", run_dir)
    assert delivered.returncode == 0, delivered.stdout + delivered.stderr
    assert Journal(run_dir).pending == 0
    run = latest_run(client_as(team_server, ADMIN), "team-offline")
    assert run.info.status == "FINISHED" and metric_steps(client_as(team_server, ADMIN), run.info.run_id,
                                                          "val/acc1") == [1]  # fmt: skip


def test_requests_by_the_machines_name_or_address_are_answered_and_a_foreign_host_is_refused(team_server):
    port = team_server.rsplit(":", 1)[1]
    url = f"{team_server}/api/2.0/mlflow/experiments/search"
    address = next(h for h in machine_hosts() if h[0].isdigit() and not h.startswith("127."))
    for host in (socket.gethostname(), address, f"localhost:{port}"):
        status, _ = http(url, login=ADMIN, host=f"{host}:{port}" if ":" not in host else host, body=search_body())
        assert status == 200, host
    status, said = http(url, login=ADMIN, host=f"attacker.example:{port}", body=search_body())
    assert status == 403 and "Invalid Host header" in said


def test_off_loopback_the_admin_password_must_be_given(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_AUTH_ADMIN_PASSWORD", raising=False)
    public = TrackingServer(backend_store_uri="sqlite:///x.db", artifacts_destination="a", host="0.0.0.0",
                            state_dir=tmp_path)  # fmt: skip
    with pytest.raises(ServerSetupError, match="MLFLOW_AUTH_ADMIN_PASSWORD or --admin-password-file"):
        admin_password(public)
    local = TrackingServer(backend_store_uri="sqlite:///x.db", artifacts_destination="a", state_dir=tmp_path)
    made, where = admin_password(local)
    assert len(made) >= 16 and admin_password(local) == (made, where), "made once, then kept"
    assert (Path(where).stat().st_mode & 0o777) == 0o600
    with pytest.raises(ServerSetupError):  # the made one is for loopback only
        admin_password(public)
    secret = tmp_path / "secret"
    secret.write_text("from-a-secret-file\n")
    given = TrackingServer(backend_store_uri="sqlite:///x.db", artifacts_destination="a", host="0.0.0.0",
                           state_dir=tmp_path, admin_password_file=secret)  # fmt: skip
    assert admin_password(given) == ("from-a-secret-file", str(secret))


def test_moving_an_alias_is_a_privilege_the_server_enforces(team_server, tmp_path):
    """EDIT registers versions; moving @champion (what serves), renaming the model or rewriting a version's
    recorded checkpoint digest needs the model's MANAGE right or the promoter role."""
    admin = client_as(team_server, ADMIN)
    admin.create_registered_model("team-prod")
    run = admin.create_run(admin.create_experiment("team-prod-runs"))
    admin.create_model_version("team-prod", source=f"{run.info.artifact_uri}/best.pt", run_id=run.info.run_id)
    added = dlops(team_server, ADMIN, "users", "add", "carol", "--role", "editor")
    assert added.returncode == 0, added.stdout + added.stderr
    carol = ("carol", added.stdout.split("hand it over privately): ")[1].strip())
    editor = client_as(team_server, carol)
    editor.set_model_version_tag("team-prod", "1", "note", "an editor tags versions")
    for refused in (lambda: editor.set_registered_model_alias("team-prod", "champion", "1"),
                    lambda: editor.rename_registered_model("team-prod", "team-prod-old"),
                    lambda: editor.set_model_version_tag("team-prod", "1", "checkpoint_sha256", "0" * 64)):  # fmt: skip
        with pytest.raises(MlflowException) as error:
            refused()
        assert error.value.get_http_status_code() == 403
    said = dlops(team_server, carol, "promote", "models:/team-prod/1", "--alias", "champion")
    assert said.returncode == 1 and "HTTP 403" in said.stderr and "--role promoter" in said.stderr, said.stderr

    granted = dlops(team_server, ADMIN, "users", "set-role", "carol", "--role", "promoter")
    assert granted.returncode == 0, granted.stdout + granted.stderr
    promoted = dlops(team_server, carol, "promote", "models:/team-prod/1", "--alias", "champion")
    assert promoted.returncode == 0 and "@champion now points at team-prod/1" in promoted.stdout, promoted.stderr
    assert admin.get_model_version_by_alias("team-prod", "champion").version == "1"


def test_the_server_registers_versions_only_from_its_own_artifacts_or_a_listed_store(team_server):
    admin = client_as(team_server, ADMIN)
    admin.create_registered_model("team-sources")
    foreign_sources = (
        "http://127.0.0.1:9/planted/best.pt",
        "s3://someone-elses-bucket/best.pt",
        "s3://team-bucket/models-elsewhere/best.pt",
        "mlflow-artifacts://10.9.9.9:5000/1/best.pt",
    )
    for foreign in foreign_sources:
        with pytest.raises(MlflowException) as error:
            admin.create_model_version("team-sources", source=foreign)
        assert error.value.get_http_status_code() == 400, foreign
    run = admin.create_run(admin.create_experiment("team-sources-runs"))
    own = f"{run.info.artifact_uri}/best.pt"
    assert own.startswith("mlflow-artifacts:/")
    assert admin.create_model_version("team-sources", source=own, run_id=run.info.run_id).source == own
    listed = "s3://team-bucket/models/best.pt"
    assert admin.create_model_version("team-sources", source=listed).source == listed
