"""The team's MLflow tracking server, behind MLflow's own logins (`dlops tracking-server`, `make mlflow-server`).

    MLFLOW_AUTH_ADMIN_PASSWORD=... dlops tracking-server --host 0.0.0.0 \\
        --backend-store-uri postgresql://mlflow:...@127.0.0.1:5432/mlflow

It runs `mlflow server --app-name basic-auth` (MLflow's auth app: users, passwords, READ/EDIT/MANAGE
rights) with three things settled here rather than by hand:

- the admin's password comes from MLFLOW_AUTH_ADMIN_PASSWORD or a secret file (--admin-password-file,
  e.g. /run/secrets/...). On loopback, without either, a random one is made once and kept (mode 600)
  in the state dir, for the one person on this machine; bound anywhere else, the server refuses to
  start without one given. MLflow creates the admin with it on the first start only.
- the Host headers it answers: MLflow refuses a request whose Host header it does not list (DNS
  rebinding). Bound off loopback, the list holds this machine's names and addresses, which is what
  teammates type; a proxy's or DNS alias's name goes in MLFLOW_ALLOWED_HOSTS (or --allowed-hosts).
- where the logins live: in the PostgreSQL database of the runs when the store is one, else in a
  SQLite file in the state dir.
"""

from __future__ import annotations

import base64
import ipaddress
import os
import secrets
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import psutil

from serving.server import executable

ADMIN = "admin"
PASSWORD_ENV = "MLFLOW_AUTH_ADMIN_PASSWORD"  # MLflow's own variable for the first admin's password
ALLOWED_HOSTS_ENV = "MLFLOW_ALLOWED_HOSTS"
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")
DEFAULT_STATE_DIR = Path("mlruns/auth")


class ServerSetupError(RuntimeError):
    """The server cannot start as asked; the message says what to set."""


@dataclass(frozen=True, kw_only=True)
class TrackingServer:
    backend_store_uri: str
    artifacts_destination: str
    host: str = "127.0.0.1"
    port: int = 5000
    workers: int = 2
    state_dir: Path = DEFAULT_STATE_DIR  # the auth config, and the SQLite logins and generated password
    auth_db_uri: str | None = None  # default: the store's PostgreSQL database, else state_dir/basic_auth.db
    admin_password_file: Path | None = None
    allowed_hosts: str = "auto"  # auto, or a comma list where "machine" stands for this machine's names

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::") else self.host  # noqa: S104 - read, not bound
        return f"http://{host}:{self.port}"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def machine_hosts() -> list[str]:
    """This machine's names and addresses as a client writes them in a URL (IPv6 in brackets)."""
    names = {socket.gethostname(), socket.getfqdn()}
    for addresses in psutil.net_if_addrs().values():
        for address in addresses:
            if address.family == socket.AF_INET:
                names.add(address.address)
            elif address.family == socket.AF_INET6 and not address.address.startswith("fe80"):
                names.add(f"[{address.address}]")
    return sorted(name for name in names if name)


def reachable_names(server: TrackingServer, extra: str | None = None) -> list[str]:
    """The names clients may call the server by: the loopback names, this machine's names and addresses
    when bound off loopback (or "machine" in --allowed-hosts), the names --allowed-hosts lists and those
    in `extra` (MLFLOW_ALLOWED_HOSTS). A name may carry its own port (a proxy's: proxy.example:443)."""
    asked = [] if server.allowed_hosts == "auto" else [h.strip() for h in server.allowed_hosts.split(",") if h.strip()]
    names = list(LOOPBACK_NAMES)
    if (server.allowed_hosts == "auto" and not is_loopback(server.host)) or "machine" in asked:
        names += machine_hosts()
    names += [h for h in asked if h != "machine"]
    names += [h.strip() for h in (extra or "").split(",") if h.strip()]
    return list(dict.fromkeys(names))


def _with_port(name: str, port: int) -> list[str]:
    has_port = ":" in name.rpartition("]")[2] if name.startswith("[") else ":" in name
    return [name] if has_port else [name, f"{name}:{port}"]


def host_headers(names: list[str], port: int) -> list[str]:
    """What MLflow's --allowed-hosts matches: the Host header, with and without the port. Anything
    else gets 403 (a DNS-rebinding guard)."""
    return [header for name in names for header in _with_port(name, port)]


def server_command(server: TrackingServer, names: list[str]) -> list[str]:
    origins = [f"http://{_with_port(name, server.port)[-1]}" for name in names]
    return [
        executable("mlflow"), "server", "--app-name", "basic-auth",
        "--backend-store-uri", server.backend_store_uri, "--artifacts-destination", server.artifacts_destination,
        "--host", server.host, "--port", str(server.port), "--workers", str(server.workers),
        "--allowed-hosts", ",".join(host_headers(names, server.port)), "--cors-allowed-origins", ",".join(origins),
    ]  # fmt: skip


def admin_password(server: TrackingServer) -> tuple[str, str]:
    """(password, where it came from). Off loopback it must be given; on loopback one is made once."""
    if server.admin_password_file is not None:
        password = server.admin_password_file.read_text(encoding="utf-8").strip()
        if not password:
            raise ServerSetupError(f"--admin-password-file {server.admin_password_file} is empty")
        return password, str(server.admin_password_file)
    if os.environ.get(PASSWORD_ENV):
        return os.environ[PASSWORD_ENV], PASSWORD_ENV
    if not is_loopback(server.host):
        raise ServerSetupError(f"--host {server.host} reaches other machines: give the admin's password in "
                               f"{PASSWORD_ENV} or --admin-password-file (a generated or default one is for "
                               "loopback only)")  # fmt: skip
    kept = server.state_dir / "admin-password"
    if not kept.is_file():
        kept.parent.mkdir(parents=True, exist_ok=True)
        kept.touch(mode=0o600)
        kept.write_text(secrets.token_urlsafe(18) + "\n", encoding="utf-8")
    return kept.read_text(encoding="utf-8").strip(), str(kept)


def auth_database(server: TrackingServer) -> str:
    if server.auth_db_uri:
        return server.auth_db_uri
    if server.backend_store_uri.startswith(("postgresql://", "postgresql+")):
        return server.backend_store_uri  # MLflow keeps the logins in tables of their own (alembic_version_auth)
    return f"sqlite:///{(server.state_dir / 'basic_auth.db').resolve()}"


def write_auth_config(server: TrackingServer) -> Path:
    """MLflow's auth ini (no secret in it: the password travels in the server's environment)."""
    server.state_dir.mkdir(parents=True, exist_ok=True)
    config = server.state_dir / "basic_auth.ini"
    config.write_text(
        "[mlflow]\n"
        "# rights of a logged-in user on what no grant covers: read everything, change nothing\n"
        "default_permission = READ\n"
        f"database_uri = {auth_database(server)}\n"
        f"admin_username = {ADMIN}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n",
        encoding="utf-8",
    )
    return config


def server_environment(server: TrackingServer, password: str) -> dict[str, str]:
    return {
        **os.environ,
        "MLFLOW_AUTH_CONFIG_PATH": str(write_auth_config(server).resolve()),
        PASSWORD_ENV: password,
        # signs the login form's CSRF tokens; one per start, shared by the workers through the environment
        "MLFLOW_FLASK_SERVER_SECRET_KEY": os.environ.get("MLFLOW_FLASK_SERVER_SECRET_KEY") or secrets.token_hex(32),
        # MLflow's background job runners serve its GenAI features, which dlops does not use
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": os.environ.get("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false"),
    }


def _wait_healthy(url: str, process: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise ServerSetupError(f"mlflow server exited with code {process.returncode} (its output is above)")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise ServerSetupError(f"mlflow server did not answer {url}/health within {timeout_s:.0f} s")


def admin_login_works(url: str, password: str) -> bool:
    """Whether the admin logs in with `password` (MLflow sets it when it creates the admin, on the first
    start only: a later password is ignored)."""
    token = base64.b64encode(f"{ADMIN}:{password}".encode()).decode()
    request = urllib.request.Request(f"{url}/api/2.0/mlflow/users/get?username={ADMIN}",
                                     headers={"Authorization": f"Basic {token}"})  # fmt: skip
    try:
        with urllib.request.urlopen(request, timeout=10):
            return True
    except urllib.error.HTTPError:
        return False


def run_server(server: TrackingServer, timeout_s: float = 180.0) -> int:
    """Start the server, say how to reach it, and wait until it ends (SIGTERM/SIGINT stop it)."""
    password, source = admin_password(server)
    names = reachable_names(server, os.environ.get(ALLOWED_HOSTS_ENV))
    process = subprocess.Popen(server_command(server, names), env=server_environment(server, password))
    stop = lambda signum, frame: process.send_signal(signal.SIGTERM)  # noqa: E731 - a one-line handler
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        _wait_healthy(server.url, process, timeout_s)
    except ServerSetupError:
        process.terminate()
        process.wait(timeout=30)
        raise
    print(f"=> MLflow tracking server with logins at {server.url} (bound to {server.host}); it answers to "
          f"{', '.join(names)}", flush=True)  # fmt: skip
    if admin_login_works(server.url, password):
        print(f"=> admin login: user {ADMIN!r}, password from {source}", flush=True)
    else:
        print(f"warning: the admin's password from {source} does not log in: the admin was created earlier "
              "with another one (MLflow sets it on the first start only)", flush=True)  # fmt: skip
    print(f"=> teammates: `dlops users add NAME --role reader|editor` (as the admin, MLFLOW_TRACKING_URI="
          f"{server.url}); clients set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD", flush=True)  # fmt: skip
    return process.wait()
