"""The team's MLflow tracking server, behind MLflow's own logins (`dlops tracking-server`, `make mlflow-server`).

    MLFLOW_AUTH_ADMIN_PASSWORD=... MLFLOW_BACKEND_STORE_URI=postgresql://mlflow:...@127.0.0.1:5432/mlflow \\
        dlops tracking-server --host 0.0.0.0 --tls auto

It runs `mlflow server --app-name dlops-auth` (MLflow's basic-auth app, users and READ/EDIT/MANAGE
rights, with moving an alias made a privilege: training/tracking/auth_app.py) with these settled
here rather than by hand:

- the admin's password comes from MLFLOW_AUTH_ADMIN_PASSWORD or a secret file (--admin-password-file,
  e.g. /run/secrets/...). On loopback, without either, a random one is made once and kept (mode 600)
  in the state dir, for the one person on this machine; bound anywhere else, the server refuses to
  start without one given. MLflow creates the admin with it on the first start only.
- secrets stay out of sight: the store's URI (with its database password, or the password read from
  --database-password-file) reaches MLflow in its environment, never in a command line; the state
  dir is owner-only (0700) and the auth config, which names the logins' database, is 0600; MLflow
  gets an allow-listed environment (serving/secrets.py: no client login, cloud keys only for the
  artifacts' own store).
- TLS off loopback: a certificate given (--tls-cert/--tls-key) or one made for the stack (--tls auto:
  a CA kept in the state dir and a certificate for every name the server answers to; the CA is
  printed for teammates to trust). Plain HTTP off loopback only with --insecure-http, said loudly.
- model sources: a version may be registered only from this server's own artifacts (mlflow-artifacts:,
  runs:/, models:/) or a store the admin lists (--artifact-store s3://team-bucket/, or $DLOPS_ARTIFACT_STORES),
  through MLflow's MLFLOW_CREATE_MODEL_VERSION_SOURCE_VALIDATION_REGEX.
- the Host headers it answers: MLflow refuses a request whose Host header it does not list (DNS
  rebinding). Bound off loopback, the list holds this machine's names and addresses, which is what
  teammates type; a proxy's or DNS alias's name goes in MLFLOW_ALLOWED_HOSTS (or --allowed-hosts).
- where the logins live: in the PostgreSQL database of the runs when the store is one, else in a
  SQLite file in the state dir.
"""

from __future__ import annotations

import base64
import os
import secrets
import signal
import ssl
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from serving import environment
from serving.secrets import child_environment, private_dir, redact, write_private
from serving.server import executable
from serving.tls import LOOPBACK_NAMES, TlsFiles, is_loopback, machine_hosts, server_tls
from training.tracking.sources import source_pattern

ADMIN = "admin"
APP_NAME = "dlops-auth"  # the mlflow.app entry point of training/tracking/auth_app.py (pyproject.toml)
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
    database_password_file: Path | None = None  # put into the store's (and logins') database URI
    allowed_hosts: str = "auto"  # auto, or a comma list where "machine" stands for this machine's names
    tls: str = "off"  # off, or auto (a CA and certificate made for the stack); a tls_cert given is used as it is
    tls_cert: Path | None = None
    tls_key: Path | None = None
    insecure_http: bool = False  # off loopback without TLS: only when asked for in so many words
    artifact_stores: tuple[str, ...] = ()  # stores besides this server's own that versions may come from

    @property
    def scheme(self) -> str:
        return "https" if self.tls == "auto" or self.tls_cert else "http"

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::") else self.host  # noqa: S104 - read, not bound
        return f"{self.scheme}://{host}:{self.port}"


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


def server_command(server: TrackingServer, names: list[str], tls: TlsFiles | None) -> list[str]:
    """`mlflow server`'s command line: nothing secret in it (the store's URI travels in the environment)."""
    origins = [f"{server.scheme}://{_with_port(name, server.port)[-1]}" for name in names]
    command = [
        executable("mlflow"), "server", "--app-name", APP_NAME, "--artifacts-destination", server.artifacts_destination,
        "--host", server.host, "--port", str(server.port), "--workers", str(server.workers),
        "--allowed-hosts", ",".join(host_headers(names, server.port)), "--cors-allowed-origins", ",".join(origins),
    ]  # fmt: skip
    if tls is not None:  # uvicorn terminates TLS itself
        command += ["--uvicorn-opts", f"--ssl-certfile {tls.cert} --ssl-keyfile {tls.key}"]
    return command


def admin_password(server: TrackingServer) -> tuple[str, str]:
    """(password, where it came from). Off loopback it must be given; on loopback one is made once."""
    if server.admin_password_file is not None:
        password = server.admin_password_file.read_text(encoding="utf-8").strip()
        if not password:
            raise ServerSetupError(f"--admin-password-file {server.admin_password_file} is empty")
        return password, str(server.admin_password_file)
    if os.environ.get(environment.ADMIN_PASSWORD):
        return os.environ[environment.ADMIN_PASSWORD], environment.ADMIN_PASSWORD
    if not is_loopback(server.host):
        raise ServerSetupError(f"--host {server.host} reaches other machines: give the admin's password in "
                               f"{environment.ADMIN_PASSWORD} or --admin-password-file (a generated or default one "
                               "is for loopback only)")  # fmt: skip
    kept = server.state_dir / "admin-password"
    if not kept.is_file():
        private_dir(server.state_dir)
        write_private(kept, secrets.token_urlsafe(18) + "\n")
    return kept.read_text(encoding="utf-8").strip(), str(kept)


def with_password(uri: str, password_file: Path | None) -> str:
    """`uri` with the password in `password_file` as its login's password (a URI given without one)."""
    if password_file is None:
        return uri
    password = password_file.read_text(encoding="utf-8").strip()
    if not password:
        raise ServerSetupError(f"--database-password-file {password_file} is empty")
    parts = urllib.parse.urlsplit(uri)
    user, _, host = parts.netloc.rpartition("@")
    if not user:
        raise ServerSetupError(f"{redact(uri)}: name the database user (postgresql://USER@HOST/DB) to log in with "
                               "the password of --database-password-file")  # fmt: skip
    login = f"{user.partition(':')[0]}:{urllib.parse.quote(password, safe='')}"
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{login}@{host}"))


def store_uri(server: TrackingServer) -> str:
    return with_password(server.backend_store_uri, server.database_password_file)


def auth_database(server: TrackingServer) -> str:
    if server.auth_db_uri:
        return with_password(server.auth_db_uri, server.database_password_file)
    if server.backend_store_uri.startswith(("postgresql://", "postgresql+")):
        return store_uri(server)  # MLflow keeps the logins in tables of their own (alembic_version_auth)
    return f"sqlite:///{(server.state_dir / 'basic_auth.db').resolve()}"


def write_auth_config(server: TrackingServer) -> Path:
    """MLflow's auth ini, owner-only: its database URI may hold the database's password (MLflow reads that
    URI from this file only)."""
    config = private_dir(server.state_dir) / "basic_auth.ini"
    write_private(
        config,
        "[mlflow]\n"
        "# rights of a logged-in user on what no grant covers: read everything, change nothing\n"
        "default_permission = READ\n"
        # configparser reads %(name)s as a reference: a percent-encoded password's % is written %%
        f"database_uri = {auth_database(server).replace('%', '%%')}\n"
        f"admin_username = {ADMIN}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n",
    )
    return config


def server_environment(server: TrackingServer, password: str) -> dict[str, str]:
    """MLflow's environment: the allow-listed one (serving/secrets.py) and what the server needs,
    secrets included, which a command line would show to every user of the machine."""
    return child_environment("mlflow", store_uri=server.artifacts_destination, extra={
        environment.BACKEND_STORE_URI: store_uri(server),
        environment.AUTH_CONFIG_PATH: str(write_auth_config(server).resolve()),
        environment.ADMIN_PASSWORD: password,
        environment.SOURCE_REGEX: source_pattern(server.artifact_stores),
        # signs the login form's CSRF tokens; one per start, shared by the workers through the environment
        environment.FLASK_SECRET_KEY: os.environ.get(environment.FLASK_SECRET_KEY) or secrets.token_hex(32),
        # MLflow's background job runners serve its GenAI features, which dlops does not use
        environment.JOB_EXECUTION: os.environ.get(environment.JOB_EXECUTION, "false"),
    })  # fmt: skip


def presented_tls(server: TrackingServer, names: list[str]) -> TlsFiles | None:
    """The certificate the server presents (None: plain HTTP), or why it cannot start as asked."""
    tls = server_tls(server.tls, cert=server.tls_cert, key=server.tls_key, directory=server.state_dir / "tls",
                     names=[n.rpartition(":")[0] if _has_port(n) else n for n in names])  # fmt: skip
    if tls is None and not is_loopback(server.host) and not server.insecure_http:
        raise ServerSetupError(f"--host {server.host} reaches other machines, and logins would cross the network "
                               "in clear: give --tls-cert/--tls-key, or --tls auto (a CA and certificate made "
                               "for this stack), or say --insecure-http on purpose")  # fmt: skip
    return tls


def _has_port(name: str) -> bool:
    return ":" in name.rpartition("]")[2] if name.startswith("[") else ":" in name


def _own_server(url: str) -> ssl.SSLContext | None:
    """How this process checks the server it just started on loopback: its TLS, whatever names the
    certificate covers (clients elsewhere verify it for real)."""
    if not url.startswith("https://"):
        return None
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    return context


def _wait_healthy(url: str, process: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise ServerSetupError(f"mlflow server exited with code {process.returncode} (its output is above)")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2, context=_own_server(url)):  # noqa: S310
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
        with urllib.request.urlopen(request, timeout=10, context=_own_server(url)):  # noqa: S310
            return True
    except urllib.error.HTTPError:
        return False


def run_server(server: TrackingServer, timeout_s: float = 180.0) -> int:
    """Start the server, say how to reach it, and wait until it ends (SIGTERM/SIGINT stop it)."""
    password, source = admin_password(server)
    names = reachable_names(server, os.environ.get(environment.ALLOWED_HOSTS))
    tls = presented_tls(server, names)
    process = subprocess.Popen(server_command(server, names, tls), env=server_environment(server, password))
    stop = lambda signum, frame: process.send_signal(signal.SIGTERM)  # noqa: E731 - a one-line handler
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        _wait_healthy(server.url, process, timeout_s)
    except ServerSetupError:
        process.terminate()
        process.wait(timeout=30)
        raise
    _say_how_to_reach(server, names, tls, password=password, source=source)
    return process.wait()


def _say_how_to_reach(server: TrackingServer, names: list[str], tls: TlsFiles | None, *, password: str,
                      source: str) -> None:  # fmt: skip
    print(f"=> MLflow tracking server with logins at {server.url} (bound to {server.host}); it answers to "
          f"{', '.join(names)}", flush=True)  # fmt: skip
    if tls is None and not is_loopback(server.host):
        print(f"warning: --insecure-http: logins cross the network in clear to {server.host}:{server.port}", flush=True)
    elif tls is not None and tls.ca is not None:
        print(f"=> TLS with the stack's own CA: teammates trust {tls.ca.resolve()} (copy it to them; set "
              f"{environment.TRACKING_CA} to it)", flush=True)  # fmt: skip
    stores = (
        ", ".join(server.artifact_stores)
        or f"none besides its own (--artifact-store or ${environment.ARTIFACT_STORES})"
    )
    print(f"=> model versions are registered from this server's artifacts only; other stores: {stores}", flush=True)
    if admin_login_works(server.url, password):
        print(f"=> admin login: user {ADMIN!r}, password from {source}", flush=True)
    else:
        print(f"warning: the admin's password from {source} does not log in: the admin was created earlier "
              "with another one (MLflow sets it on the first start only)", flush=True)  # fmt: skip
    print(f"=> teammates: `dlops users add NAME --role reader|editor|promoter` (as the admin, MLFLOW_TRACKING_URI="
          f"{server.url}); clients set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD", flush=True)  # fmt: skip
