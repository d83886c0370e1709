"""A fleet: one or more TorchServe servers behind the gateway (HAProxy), addressed by one state dir.

    dlops serve --servers 2 --state-dir logs/fleet ...     # starts both servers and the gateway

    <fleet>/fleet.json        its members and the gateway's settings
    <fleet>/server.json       the gateway's URLs, as one server's: clients (`dlops predict`, `keys show`)
                              use a fleet exactly as they use one server
    <fleet>/key_file.json     the fleet's inference key, checked by the gateway (owner-only)
    <fleet>/serving.json      what serves and the history (serving/served.py)
    <fleet>/gateway/          HAProxy's configuration, routes and access log (serving/gateway.py)
    <fleet>/servers/<name>/   each member's state dir: a TorchServe whose inference and management APIs
                              are Unix sockets in an owner-only folder (no keys: only the gateway and
                              this user's dlops reach them), its metrics API on a loopback port

Members are started one after the other with the same archives; a member started later
(`add_member`) loads the versions the fleet serves before the gateway sends it a request.
"""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from serving import gateway, served
from serving.client import SERVER_FILE, ServerClient, read_server_file
from serving.keys import key_file
from serving.secrets import private_dir
from serving.server import LOOPBACK, PREDICTIONS, ServeError, ServeOptions, local_url, mar_identity, start, stop

FLEET_FILE = "fleet.json"
GATEWAY_DIR = "gateway"
MEMBERS_DIR = "servers"


@dataclass(kw_only=True)
class Fleet:
    state_dir: Path
    members: list[str]
    address: str = "127.0.0.1"
    port: int = 8080
    metrics_port: int = 8082
    auth: bool = True
    tls_pem: str | None = None

    @classmethod
    def of(cls, state_dir: Path) -> Fleet | None:
        """The fleet whose state dir is `state_dir`; None for a single server's state dir."""
        path = Path(state_dir) / FLEET_FILE
        if not path.is_file():
            return None
        return cls(state_dir=Path(state_dir), **json.loads(path.read_text(encoding="utf-8")))

    def save(self) -> None:
        record = {k: v for k, v in asdict(self).items() if k != "state_dir"}
        (self.state_dir / FLEET_FILE).write_text(json.dumps(record, indent=1), encoding="utf-8")

    @property
    def gateway_dir(self) -> Path:
        return self.state_dir.resolve() / GATEWAY_DIR

    def member_dir(self, name: str) -> Path:
        return self.state_dir.resolve() / MEMBERS_DIR / name

    def member(self, name: str) -> ServerClient:
        return ServerClient.of(self.member_dir(name))

    def servers(self) -> list[ServerClient]:
        """A client of every member (each acts on that server alone)."""
        return [self.member(name) for name in self.members]

    def live_servers(self) -> list[ServerClient]:
        """The members that answer now (the gateway keeps the others out); each one that does not is said."""
        live = []
        for name, server in zip(self.members, self.servers(), strict=True):
            try:
                server.management("GET", "/models", timeout_s=10)
                live.append(server)
            except OSError as e:
                print(f"warning: server {name} of the fleet does not answer ({e}); left out until it is back")
        if not live:
            raise ServeError(f"no server of the fleet in {self.state_dir} answers")
        return live

    def gateway_settings(self) -> gateway.GatewaySettings:
        sockets = {name: Path(self.member(name).urls["inference"].removeprefix("unix:")) for name in self.members}
        return gateway.GatewaySettings(address=self.address, port=self.port, metrics_port=self.metrics_port,
                                       members=sockets, auth=self.auth,
                                       tls_pem=Path(self.tls_pem) if self.tls_pem else None)  # fmt: skip

    @property
    def client(self) -> ServerClient:
        """The fleet's client: inference through the gateway, with the fleet's key."""
        return ServerClient.of(self.state_dir)


def is_fleet(state_dir: Path) -> bool:
    return (Path(state_dir) / FLEET_FILE).is_file()


def member_options(options: ServeOptions, state_dir: Path) -> ServeOptions:
    """A member: its own ports (metrics, gRPC) on loopback and Unix sockets in an owner-only folder."""
    free = ServeOptions.on_free_ports()
    loopback = {f"{api}_address": "127.0.0.1" for api in ("inference", "metrics", "management")}
    ports = {name: getattr(free, name) for name in ("metrics_port", "grpc_inference_port", "grpc_management_port")}
    # one prediction log for the fleet: each worker writes its own file, named by host and process
    return replace(options, state_dir=state_dir, sockets=gateway.sockets_dir(private_dir(state_dir)), auth=False,
                   tls_cert=None, tls_key=None, tls_ca=None, prediction_log=options.prediction_folder,
                   **loopback, **ports)  # fmt: skip


def _tls_pem(options: ServeOptions, directory: Path) -> str | None:
    """HAProxy takes the certificate and its key in one file (owner-only)."""
    if not options.tls:
        return None
    pem = directory / "tls.pem"
    pem.write_bytes(Path(options.tls_cert).read_bytes() + Path(options.tls_key).read_bytes())
    pem.chmod(0o600)
    return str(pem)


def new_key(fleet: Fleet) -> str:
    """A new inference key for the fleet: in key_file.json (TorchServe's format, no expiry) and the only one
    the gateway accepts from now on."""
    key = secrets.token_urlsafe(24)
    path = key_file(fleet.state_dir)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps({"inference": {"key": key}}), encoding="utf-8")
    tmp.chmod(0o600)
    for old in gateway.read_map(fleet.gateway_dir, "keys"):
        gateway.set_entry(fleet.gateway_dir, "keys", old, None)
    gateway.set_entry(fleet.gateway_dir, "keys", key, "fleet")
    os.replace(tmp, path)
    return key


def start_fleet(options: ServeOptions, mars: list[Path], servers: int) -> Fleet:
    """Start `servers` TorchServe servers with `mars` and the gateway in front of them; every model's
    requests go to the version its archive holds. The gateway listens where `options` say the inference
    API (and metrics) would; TLS, when given, ends at the gateway."""
    state = private_dir(options.state_dir.resolve())
    fleet = Fleet(state_dir=state, members=[f"ts-{i}" for i in range(1, servers + 1)],
                  address=options.inference_address, port=options.inference_port, metrics_port=options.metrics_port,
                  auth=options.auth)  # fmt: skip
    if options.inference_address not in LOOPBACK and not (options.tls or options.insecure_http):
        raise ServeError(f"the gateway would listen on {options.inference_address} and take keys and requests in "
                         "clear: give --tls auto (or --tls-cert/--tls-key), or --insecure-http on purpose")  # fmt: skip
    if gateway.running_pid(fleet.gateway_dir):
        raise ServeError(f"a fleet started from {state} is running: `dlops stop --state-dir {state}` first")
    started: list[str] = []
    try:
        for name in fleet.members:
            start(member_options(options, fleet.member_dir(name)), mars)
            started.append(name)
        open_gateway(fleet, options, [mar_identity(mar) for mar in mars])
    except (ServeError, gateway.GatewayError, OSError):
        for name in started:
            stop(fleet.member_dir(name))
        raise
    return fleet


def open_gateway(fleet: Fleet, options: ServeOptions, versions: list[tuple[str, str]]) -> int:
    """The gateway in front of the fleet's running members: its key, certificate and routes (`versions`: each
    model's stable version), HAProxy started, and server.json for the fleet's clients. Return HAProxy's pid."""
    if options.auth:
        new_key(fleet)
    fleet.tls_pem = _tls_pem(options, private_dir(fleet.gateway_dir))
    fleet.save()
    for model, version in versions:
        gateway.route(fleet.gateway_dir, model, stable=version, clear_canary=True)
    pid = gateway.start(fleet.gateway_dir, fleet.gateway_settings())
    scheme = "https" if options.tls else "http"
    record = {"urls": {"inference": local_url(options.inference_address, options.inference_port, scheme),
                       "metrics": local_url("127.0.0.1", options.metrics_port),
                       "management": fleet.member(fleet.members[0]).urls["management"]},
              "model_store": str(options.model_store.resolve()), "fleet": fleet.members,
              "ca": str(Path(options.tls_ca or options.tls_cert).resolve()) if options.tls else None,
              "options": {k: str(v) for k, v in asdict(options).items()}}  # fmt: skip
    (fleet.state_dir / SERVER_FILE).write_text(json.dumps(record, indent=1), encoding="utf-8")
    urls = record["urls"]
    print(f"=> the gateway (HAProxy) answers {urls['inference']} for {len(fleet.members)} TorchServe server(s); "
          f"its Prometheus metrics: {urls['metrics']}/metrics; state dir {fleet.state_dir}")  # fmt: skip
    return pid


def add_member(fleet: Fleet) -> str:
    """Start one more server with the versions the fleet serves (serving.json) and the fleet's settings;
    once every version is READY on it, the gateway sends it requests too."""
    record = read_server_file(fleet.state_dir)
    settings = record.get("options", {})
    logged = read_server_file(fleet.member_dir(fleet.members[0])).get("options", {})  # a member's prediction log
    options = ServeOptions(model_store=Path(record["model_store"]), amp=settings.get("amp", "auto"),
                           torch_threads=int(settings.get("torch_threads", 1)),
                           prediction_sample=float(logged.get("prediction_sample", 0)),
                           prediction_log=Path(logged.get("prediction_log") or fleet.state_dir / PREDICTIONS),
                           prediction_log_mb=float(logged.get("prediction_log_mb", 64)))  # fmt: skip
    mars = [options.model_store / d.mar for d in served.serving_now(fleet.state_dir)]
    name = f"ts-{max(int(n.split('-')[1]) for n in fleet.members) + 1}"
    start(member_options(options, fleet.member_dir(name)), mars)
    fleet.members.append(name)
    fleet.save()
    gateway.reload(fleet.gateway_dir, fleet.gateway_settings())
    print(f"=> {name} serves beside {', '.join(n for n in fleet.members if n != name)}")
    return name


def stop_fleet(fleet: Fleet) -> str:
    """The gateway first (it answers what it holds), then every member."""
    said = [gateway.stop(fleet.gateway_dir)]
    said += [stop(fleet.member_dir(name)) for name in fleet.members]
    for directory in (fleet.gateway_dir, *map(fleet.member_dir, fleet.members)):
        gateway.forget_sockets_dir(directory)
    return "\n".join(said)
