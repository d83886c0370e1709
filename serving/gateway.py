"""The gateway: HAProxy in front of a fleet of TorchServe servers, configured and driven by dlops.

HAProxy (Debian's package) does the plumbing: it listens where clients send inference requests
(the same URLs and `Authorization: Bearer <key>` as one TorchServe), balances them over the
fleet's servers, takes a server out when its health check fails (and sends a request that could
not reach it to another), splits each model's requests between its stable and its canary version
by weight, and logs every request with its version and latency. dlops owns the decisions: the
routes live in map files that HAProxy's runtime API changes without a reload.

    <fleet>/gateway/haproxy.cfg   written from the fleet's settings (members, address, TLS)
    <fleet>/gateway/stable.map    model -> the version /predictions/<model> answers with
    <fleet>/gateway/canary.map    model -> the canary version, weights.map: model -> its share in %
    <fleet>/gateway/keys.map      the fleet's inference key(s) (owner-only, like the whole folder)
    <fleet>/gateway/access.log    one line per request: time, model, version, route, status, ms
    <sockets>/admin.sock          HAProxy's runtime API (owner-only folder; short path: see sockets_dir)

A request that names a version (/predictions/<model>/<version>) goes where it says; one that does
not is rewritten to the stable or canary version, drawn per request with the canary's weight.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from serving.keys import REFUSED, process_alive
from serving.secrets import child_environment, private_dir

HAPROXY_HINT = "the gateway is HAProxy: sudo apt-get install -y haproxy"
STABLE, CANARY = "stable", "canary"  # the two routes (HAProxy backends) a model's requests take
MAPS = ("stable", "canary", "weights", "keys")
ACCESS_LOG = "access.log"
PID_FILE = "haproxy.pid"
# A request is retried on another server when it could not be delivered; HAProxy keeps a copy of
# requests up to this size to do so (bigger ones are not retried)
BUFFER_BYTES = 131072
HAPROXY_SOCKET_MAX = 97  # characters of a server's socket path HAProxy 2.6 takes (less than Linux's 107)
REQUEST_TIMEOUT_S = 130  # past TorchServe's own default_response_timeout (120 s): its answer, not ours
LOG_FORMAT = "%Ts.%ms %[var(txn.model)] %[var(txn.version)] %b %ST %Ta %tsc"


class GatewayError(RuntimeError):
    pass


@dataclass(kw_only=True, frozen=True)
class GatewaySettings:
    address: str = "127.0.0.1"
    port: int = 8080
    metrics_port: int = 8082  # HAProxy's Prometheus exporter (/metrics) and stats page (/stats), loopback
    members: dict[str, Path] = field(default_factory=dict)  # server name -> its inference socket
    auth: bool = True
    tls_pem: Path | None = None  # certificate and key in one file: TLS ends at the gateway


def haproxy() -> str:
    found = shutil.which("haproxy") or next((p for p in ("/usr/sbin/haproxy",) if Path(p).is_file()), None)
    if found is None:
        raise GatewayError(f"haproxy was not found on PATH. {HAPROXY_HINT}")
    return found


def sockets_dir(directory: Path) -> Path:
    """An owner-only folder for Unix sockets: in `directory` when its path is short enough for a socket's
    (HAProxy takes at most HAPROXY_SOCKET_MAX characters), else a short one under the temporary folder,
    recorded in `directory`."""
    directory = Path(directory).resolve()
    if len(str(directory / "s" / "management.sock")) <= HAPROXY_SOCKET_MAX:
        return private_dir(directory / "s")
    recorded = directory / "sockets-dir"
    if recorded.is_file() and Path(recorded.read_text().strip()).is_dir():
        return Path(recorded.read_text().strip())
    import tempfile

    short = Path(tempfile.mkdtemp(prefix="dlops-"))
    recorded.write_text(str(short))
    return private_dir(short)


def forget_sockets_dir(directory: Path) -> None:
    """Remove the short sockets folder `directory` had under the temporary folder, if any (its server stopped)."""
    recorded = Path(directory) / "sockets-dir"
    if recorded.is_file():
        shutil.rmtree(recorded.read_text().strip(), ignore_errors=True)
        recorded.unlink()


def _admin_socket(directory: Path) -> Path:
    return sockets_dir(directory) / "admin.sock"


def _map(directory: Path, name: str) -> Path:
    return Path(directory).resolve() / f"{name}.map"


def _inference_frontend(directory: Path, settings: GatewaySettings) -> str:
    """Where clients send requests: the key checked, the version of each request chosen."""
    maps = {name: _map(directory, name) for name in MAPS}
    tls = f" ssl crt {settings.tls_pem}" if settings.tls_pem else ""
    key_check = (
        f"    acl authorized req.hdr(authorization),word(2,' '),map({maps['keys']}) -m found\n"
        f"    http-request return status 401 content-type application/json file {directory / 'refused.json'}"
        " unless authorized\n"
        if settings.auth
        else ""
    )
    return f"""frontend inference
    bind {settings.address}:{settings.port}{tls}
{key_check}    http-request set-var(txn.model) path,field(3,/) if {{ path_beg /predictions/ }}
    acl names_version path,field(4,/) -m len gt 0
    # one draw per request: below the canary's weight (in %) it goes to the canary
    http-request set-var(txn.draw) rand(100)
    http-request set-var(txn.weight) var(txn.model),map({maps["weights"]},0)
    acl to_canary var(txn.draw),sub(txn.weight) lt 0
    acl has_canary var(txn.model),map({maps["canary"]}) -m found
    http-request set-var(txn.route) str({CANARY}) if to_canary has_canary !names_version
    http-request set-var(txn.version) var(txn.model),map({maps["canary"]}) if to_canary has_canary !names_version
    http-request set-var(txn.version) var(txn.model),map({maps["stable"]}) if !to_canary !names_version
    http-request set-var(txn.version) var(txn.model),map({maps["stable"]}) if !has_canary !names_version
    acl routed var(txn.version) -m found
    # (the route is decided before the rewrite: afterwards every path names a version)
    http-request set-path /predictions/%[var(txn.model)]/%[var(txn.version)] if routed !names_version
    use_backend {CANARY} if {{ var(txn.route) -m str {CANARY} }}
    default_backend {STABLE}
"""


def config_text(directory: Path, settings: GatewaySettings) -> str:
    """HAProxy's configuration for the fleet (comments say why each line is there)."""
    directory = Path(directory).resolve()
    members = sorted(settings.members.items())
    servers = "\n".join(f"    server {name} {path} check inter 500ms fall 2 rise 2" for name, path in members)
    # the canary route's servers are the same servers: they follow the stable route's health checks
    tracked = "\n".join(f"    server {name} {path} track {STABLE}/{name}" for name, path in members)
    return f"""# Written by dlops (serving/gateway.py) for the fleet in {directory.parent}; rewritten when it changes.
global
    stats socket {_admin_socket(directory)} mode 600 level admin
    log stdout format raw local0 info
    tune.bufsize {BUFFER_BYTES}
    maxconn 1000

defaults
    mode http
    log global
    log-format "{LOG_FORMAT}"
    timeout connect 2s
    timeout client {REQUEST_TIMEOUT_S}s
    timeout server {REQUEST_TIMEOUT_S}s
    timeout http-request 30s
    # a request that could not reach its server (refused, reset before an answer) goes to another one
    retry-on conn-failure empty-response
    retries 3
    option redispatch 1

{_inference_frontend(directory, settings)}
frontend metrics
    bind 127.0.0.1:{settings.metrics_port}
    no log
    http-request use-service prometheus-exporter if {{ path /metrics }}
    stats enable
    stats uri /stats

backend {STABLE}
    balance roundrobin
    option httpchk GET /ping
    http-check expect status 200
{servers}

backend {CANARY}
    balance roundrobin
{tracked}
"""


def write_config(directory: Path, settings: GatewaySettings) -> Path:
    directory = private_dir(Path(directory).resolve())
    for name in MAPS:
        _map(directory, name).touch(mode=0o600, exist_ok=True)
    (directory / "refused.json").write_text(
        f'{{"code": 401, "type": "GatewayAuthorization", "message": "{REFUSED}: send the fleet\'s inference key as '
        f'Authorization: Bearer <key> (`dlops keys show --state-dir <fleet>`)"}}\n',
        encoding="utf-8",
    )
    config = directory / "haproxy.cfg"
    config.write_text(config_text(directory, settings), encoding="utf-8")
    checked = subprocess.run([haproxy(), "-c", "-f", str(config)], capture_output=True, text=True)
    if checked.returncode != 0:
        alerts = [line for line in (checked.stdout + checked.stderr).splitlines() if "ALERT" in line]
        raise GatewayError(f"HAProxy refused {config}: {' '.join(alerts)[-2000:]}")
    return config


def running_pid(directory: Path) -> int | None:
    try:
        pid = int((Path(directory) / PID_FILE).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return pid if process_alive(pid) else None


def start(directory: Path, settings: GatewaySettings, timeout_s: float = 30.0) -> int:
    """Start HAProxy (master-worker, detached: it outlives this command) with the fleet's configuration; wait
    until its runtime API answers. Return the master's process id."""
    directory = Path(directory).resolve()
    if running_pid(directory):
        raise GatewayError(f"a gateway started from {directory} is running (process {running_pid(directory)})")
    config = write_config(directory, settings)
    with (directory / ACCESS_LOG).open("a") as log, (directory / "haproxy.log").open("a") as errors:
        process = subprocess.Popen(
            [haproxy(), "-W", "-db", "-f", str(config)], stdout=log, stderr=errors, stdin=subprocess.DEVNULL,
            start_new_session=True, env=child_environment("gateway"), umask=0o077,
        )  # fmt: skip
    (directory / PID_FILE).write_text(str(process.pid))
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            said = (directory / "haproxy.log").read_text(errors="replace").strip()[-2000:]
            raise GatewayError(f"HAProxy exited while starting: {said}")
        with contextlib.suppress(OSError):
            if "Name: HAProxy" in runtime(directory, "show info"):
                return process.pid
        time.sleep(0.1)
    stop(directory)
    raise GatewayError(f"HAProxy did not answer on {_admin_socket(directory)} within {timeout_s:.0f} s")


def reload(directory: Path, settings: GatewaySettings, timeout_s: float = 30.0) -> None:
    """Apply new settings (a server added or gone): HAProxy's master starts new workers with the new
    configuration and the old ones finish the requests they hold (no connection is refused)."""
    pid = running_pid(directory)
    if pid is None:
        raise GatewayError(f"no gateway is running from {directory}")
    write_config(directory, settings)
    before = runtime(directory, "show info")
    os.kill(pid, signal.SIGUSR2)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            now = runtime(directory, "show info")
            if _info(now, "Pid") != _info(before, "Pid"):
                return
        time.sleep(0.1)
    raise GatewayError(f"HAProxy did not reload {directory / 'haproxy.cfg'} within {timeout_s:.0f} s")


def _info(text: str, name: str) -> str:
    return next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith(f"{name}:")), "")


def stop(directory: Path, timeout_s: float = 30.0) -> str:
    """Stop the gateway: new connections are refused, the requests it holds are answered first."""
    pid = running_pid(directory)
    if pid is None:
        return f"no gateway is running from {Path(directory).resolve()}"
    os.kill(pid, signal.SIGUSR1)  # soft stop
    deadline = time.monotonic() + timeout_s
    while process_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if process_alive(pid):
        os.kill(pid, signal.SIGTERM)
    (Path(directory) / PID_FILE).unlink(missing_ok=True)
    return f"gateway stopped (process {pid})"


def runtime(directory: Path, command: str, timeout_s: float = 10.0) -> str:
    """One command to HAProxy's runtime API; its answer."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout_s)
        s.connect(str(_admin_socket(directory)))
        s.sendall(command.encode() + b"\n")
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks).decode(errors="replace")


# --- routes ------------------------------------------------------------------------------------------


def read_map(directory: Path, name: str) -> dict[str, str]:
    path = _map(directory, name)
    if not path.is_file():
        return {}
    return dict(line.split(None, 1) for line in path.read_text().splitlines() if line.strip())


def set_entry(directory: Path, name: str, key: str, value: str | None) -> None:
    """Set (None: remove) `key` in map `name`: in its file (what a reload or restart reads) and in the running
    HAProxy (effective for the next request)."""
    private_dir(Path(directory).resolve())
    entries = read_map(directory, name)
    if value is None:
        entries.pop(key, None)
    else:
        entries[key] = value
    path = _map(directory, name)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(f"{k} {v}\n" for k, v in entries.items()))
    tmp.chmod(0o600)
    os.replace(tmp, path)
    try:
        # "set map" changes a key in place (no request sees it missing); a new key needs "add map"
        command = f"del map {path} {key}" if value is None else f"set map {path} {key} {value}"
        answer = runtime(directory, command).strip()
    except (FileNotFoundError, ConnectionRefusedError):
        return  # no gateway runs: it reads the file when it starts
    if value is not None and answer:  # the key was not there yet
        answer = runtime(directory, f"add map {path} {key} {value}").strip()
        if answer:
            shown = "(the fleet's key)" if name == "keys" else key  # a key is never printed
            raise GatewayError(f"HAProxy refused the entry {name} {shown} -> {value}: {answer}")


def route(directory: Path, model: str, *, stable: str | None = None, canary: str | None = None,
          weight: int | None = None, clear_canary: bool = False) -> None:  # fmt: skip
    """Change how /predictions/<model> is answered: its stable version, its canary version and the canary's
    share of requests (0-100 %). `clear_canary` sends every request to the stable version again."""
    if weight is not None and not 0 <= weight <= 100:
        raise GatewayError(f"a canary's weight is a share of requests in %, 0 to 100; got {weight}")
    if clear_canary:
        set_entry(directory, "weights", model, None)
        set_entry(directory, "canary", model, None)
    if stable is not None:
        set_entry(directory, "stable", model, stable)
    if canary is not None:
        set_entry(directory, "canary", model, canary)
    if weight is not None:
        set_entry(directory, "weights", model, str(weight))


# --- what the requests saw ---------------------------------------------------------------------------


@dataclass(kw_only=True, frozen=True)
class Traffic:
    """The requests of one version in a window, as the gateway logged them."""

    requests: int
    errors: int  # answered 5xx, or not answered at all (timeouts, resets)
    p99_ms: float  # nearest rank over the requests' own times, not an average

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0


def _p99(times: list[int]) -> float:
    if not times:
        return math.nan
    ordered = sorted(times)
    return float(ordered[max(0, math.ceil(0.99 * len(ordered)) - 1)])


def traffic(directory: Path, model: str, since: float, until: float | None = None) -> dict[str, Traffic]:
    """Per route (stable, canary): the requests for `model` that the gateway routed (not those naming a version
    themselves), accepted from `since` (a Unix time) until `until`."""
    times: dict[str, list[int]] = {}
    errors: dict[str, int] = {}
    for line in _log_lines(Path(directory) / ACCESS_LOG):
        parts = line.split()
        if len(parts) != 7 or parts[1] != model or parts[2] == "-":  # "-": the request named its version itself
            continue
        try:
            at, status, total_ms = float(parts[0]), int(parts[4]), int(parts[5])
        except ValueError:
            continue
        if at < since or (until is not None and at >= until):
            continue
        route_name = parts[3]
        times.setdefault(route_name, []).append(max(total_ms, 0))
        errors[route_name] = errors.get(route_name, 0) + (status >= 500 or status < 0)
    return {name: Traffic(requests=len(ts), errors=errors[name], p99_ms=_p99(ts)) for name, ts in times.items()}


def _log_lines(path: Path) -> Iterable[str]:
    if not path.is_file():
        return []
    return path.read_text(errors="replace").splitlines()
