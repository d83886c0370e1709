"""Start, find and stop one TorchServe, addressed by its state dir.

A state dir holds everything of one server, so that two run side by side and a command acts on
its own server only:

    <state dir>/config.properties   the effective settings (ports, model store, auth, expiry)
    <state dir>/server.json         URLs, model store and settings of the running server
    <state dir>/serving.json        what serves and the deploy history (serving/served.py)
    <state dir>/key_file.json       TorchServe's keys (TorchServe writes it in its working dir)
    <state dir>/tmp/                TorchServe's launcher keeps its PID file in the temp folder:
                                    a temp folder per state dir makes that PID file per server
    <state dir>/logs/               TorchServe's, the workers' and the key keeper's logs

Every API binds to 127.0.0.1 behind its key. The management API can register and remove models
(what `dlops deploy` needs), limited by `allowed_urls` to the server's own model store; it stays
on 127.0.0.1 always (TorchServe's security notes, the ShellTorch advisories). Teammates on other
machines reach the inference API when `--inference-address` publishes it (with its key); the
metrics API leaves loopback only on its own request (`--metrics-address`, for a Prometheus elsewhere).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from serving import environment
from serving.client import SERVER_FILE, UNIX_PREFIX, ServerClient, read_server_file
from serving.keys import KeyFileError, process_alive, read_keys
from serving.secrets import child_environment, private_dir

CONFIG_TEMPLATE = Path(__file__).resolve().parent / "config.properties"
METRICS_CONFIG = Path(__file__).resolve().parent / "metrics.yaml"  # TorchServe's metrics plus our handlers' counters
JAVA_HINT = "TorchServe needs Java 17: sudo apt-get install -y openjdk-17-jre-headless"
PID_FILE = ".model_server.pid"  # TorchServe's launcher: tempfile.gettempdir() / this
DEFAULT_STATE_DIR = Path("logs/torchserve")
LOOPBACK = ("127.0.0.1", "localhost", "::1")  # addresses that keep an API on this machine
UNIX_SOCKET_MAX = 107  # characters of a Unix socket's path (Linux: 108 bytes with the final NUL)
MODEL_LOG = Path("logs") / "model_log.log"  # in a state dir: what TorchServe's Python workers print
TRUSTED_CA = "tls-ca.pem"  # in a container's state dir: the CA its certificate is checked against
PREDICTIONS = "predictions"  # in a state dir: the prediction log's default folder
# Keys last a day and the keeper renews them every 12 hours: a leaked key works for a day at most.
DEFAULT_TOKEN_EXPIRATION_MIN = 1440.0


class ServeError(RuntimeError):
    pass


@dataclass(kw_only=True)
class ServeOptions:
    model_store: Path = Path("model_store")
    state_dir: Path = DEFAULT_STATE_DIR
    inference_port: int = 8080
    management_port: int = 8081
    metrics_port: int = 8082
    grpc_inference_port: int = 7070
    grpc_management_port: int = 7071
    auth: bool = True
    token_expiration_min: float = DEFAULT_TOKEN_EXPIRATION_MIN
    torch_threads: int = 1
    amp: str = "auto"  # the classifier's precision: auto (bf16 where native), off, bf16
    # the prediction log (serving/handlers/prediction_log.py): the share of requests logged (0: none),
    # its folder (default: <state dir>/predictions) and one worker file's cap before it rotates
    prediction_sample: float = 0.1
    prediction_log: Path | None = None
    prediction_log_mb: float = 64.0
    timeout_s: float = 180.0
    # Where each API listens: loopback unless published on request. The management API is never
    # published, except from inside a container (management_address 0.0.0.0, the container's own
    # interface), whose runtime publishes it on the host's 127.0.0.1 only (docker/compose.yaml).
    inference_address: str = "127.0.0.1"
    metrics_address: str = "127.0.0.1"
    management_address: str = "127.0.0.1"
    # TLS for the inference and metrics APIs (TorchServe terminates it): a certificate and key (PEM),
    # and the CA clients trust it by (the stack's, recorded for this machine's clients)
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_ca: Path | None = None
    insecure_http: bool = False  # publish without TLS: only when asked for in so many words
    # A fleet's member (serving/fleet.py): the inference and management APIs on Unix sockets in this
    # owner-only folder instead of ports; the folder's permissions are the gate (no keys: the gateway
    # in front of the fleet checks the fleet's key)
    sockets: Path | None = None

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None

    @classmethod
    def on_free_ports(cls, **options: Any) -> ServeOptions:
        """Options whose five ports are free on 127.0.0.1 now (tests, benchmarks: beside any other server)."""
        sockets = [socket.socket() for _ in range(5)]
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        ports = [s.getsockname()[1] for s in sockets]
        for s in sockets:
            s.close()
        names = ("inference_port", "management_port", "metrics_port", "grpc_inference_port", "grpc_management_port")
        return cls(**dict(zip(names, ports, strict=True)), **options)

    @property
    def ports(self) -> dict[str, int]:
        """The TCP ports the server listens on (a fleet member's inference and management APIs are sockets)."""
        on_sockets = {"inference", "management"} if self.sockets else set()
        return {name: port for name, port in {
            "inference": self.inference_port, "management": self.management_port, "metrics": self.metrics_port,
            "gRPC inference": self.grpc_inference_port, "gRPC management": self.grpc_management_port,
        }.items() if name not in on_sockets}  # fmt: skip

    @property
    def prediction_folder(self) -> Path:
        return Path(self.prediction_log or Path(self.state_dir) / PREDICTIONS).resolve()

    def socket(self, api: str) -> Path:
        """The Unix socket of a fleet member's `api` (inference or management)."""
        assert self.sockets is not None
        return Path(self.sockets).resolve() / f"{api}.sock"


def read_properties(path: Path) -> dict[str, str]:
    props = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, value = line.split("=", 1)
            props[key.strip()] = value.strip()
    return props


def mar_identity(mar: Path) -> tuple[str, str]:
    """(model name, version) from a .mar's manifest."""
    with zipfile.ZipFile(mar) as zf:
        model = json.loads(zf.read("MAR-INF/MANIFEST.json"))["model"]
    return model["modelName"], model["modelVersion"]


def _url_host(address: str) -> str:
    return f"[{address}]" if ":" in address else address


def local_url(address: str, port: int, scheme: str = "http") -> str:
    """How a client on this machine reaches an API bound to `address` (any-address: over loopback)."""
    return f"{scheme}://{_url_host('127.0.0.1' if address in ('0.0.0.0', '::') else address)}:{port}"  # noqa: S104


def api_schemes(options: ServeOptions) -> dict[str, str]:
    """http or https per API: with TLS, the inference and metrics APIs (what may leave the machine); the
    management API stays plain HTTP on loopback, where `dlops deploy` and the key keeper reach it."""
    secure = "https" if options.tls else "http"
    return {"inference": secure, "metrics": secure, "management": "http"}


def effective_config(options: ServeOptions, mars: list[Path]) -> dict[str, str]:
    """The template's settings with this server's ports, paths, auth, key lifetime and TLS."""
    props = read_properties(CONFIG_TEMPLATE)
    store = options.model_store.resolve()
    scheme = api_schemes(options)
    if options.tls:
        props.update({"certificate_file": str(Path(options.tls_cert).resolve()),
                      "private_key_file": str(Path(options.tls_key).resolve())})  # fmt: skip
    props.update(_api_addresses(options, scheme))
    props.update(
        {
            "metrics_address": f"{scheme['metrics']}://{_url_host(options.metrics_address)}:{options.metrics_port}",
            # gRPC: nothing of ours speaks it; it stays on loopback whatever is published
            "grpc_inference_address": "127.0.0.1",
            "grpc_management_address": "127.0.0.1",
            "grpc_inference_port": str(options.grpc_inference_port),
            "grpc_management_port": str(options.grpc_management_port),
            "disable_token_authorization": str(not options.auth).lower(),
            "token_expiration_min": f"{options.token_expiration_min:g}",
            "model_store": str(store),
            "load_models": ",".join(mar.name for mar in mars),
            "allowed_urls": f"file://{store}/.*",
            "metrics_config": str(METRICS_CONFIG),
        }
    )
    return props


def _api_addresses(options: ServeOptions, scheme: dict[str, str]) -> dict[str, str]:
    """Where the inference and management APIs listen: ports, or a fleet member's Unix sockets (which
    TorchServe serves through its native transport)."""
    if options.sockets:
        return {"inference_address": f"{UNIX_PREFIX}{options.socket('inference')}",
                "management_address": f"{UNIX_PREFIX}{options.socket('management')}",
                "use_native_io": "true"}  # fmt: skip
    inference = f"{scheme['inference']}://{_url_host(options.inference_address)}:{options.inference_port}"
    management = f"http://{_url_host(options.management_address)}:{options.management_port}"
    return {"inference_address": inference, "management_address": management}


def api_urls(options: ServeOptions) -> dict[str, str]:
    """How this machine's clients reach each API of the server `options` start."""
    urls = {api: local_url(getattr(options, f"{api}_address"), getattr(options, f"{api}_port"), scheme)
            for api, scheme in api_schemes(options).items()}  # fmt: skip
    if options.sockets:
        urls.update({api: f"{UNIX_PREFIX}{options.socket(api)}" for api in ("inference", "management")})
    return urls


def _environment(state: Path, options: ServeOptions) -> dict[str, str]:
    """TorchServe's environment: the allow-listed one (handlers from archives run in it: no logins,
    no cloud keys) and its own settings."""
    return child_environment("torchserve", extra={
        "TMPDIR": str(state / "tmp"),  # the launcher's PID file: one per state dir, not one per machine
        "TEMP": str(state / "tmp"),  # the JVM's temp folder (unpacked archives)
        "LOG_LOCATION": str(state / "logs"),
        "METRICS_LOCATION": str(state / "logs"),
        environment.TORCH_THREADS: str(options.torch_threads),
        environment.SERVE_AMP: options.amp,
        environment.PREDICTION_LOG: str(options.prediction_folder),
        environment.PREDICTION_SAMPLE: str(options.prediction_sample),
        environment.PREDICTION_LOG_MB: str(options.prediction_log_mb),
    })  # fmt: skip


def running_pid(state_dir: Path) -> int | None:
    """The process id of the TorchServe started from `state_dir`, if it is running."""
    pid_file = Path(state_dir) / "tmp" / PID_FILE
    try:
        pid = int(pid_file.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return pid if process_alive(pid) else None


def _port_in_use(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def _check_can_start(options: ServeOptions, mars: list[Path], *, allow_empty: bool) -> None:
    if shutil.which("java") is None:
        raise ServeError(f"java was not found on PATH. {JAVA_HINT}")
    pid = running_pid(options.state_dir)
    if pid:
        raise ServeError(f"a TorchServe started from {options.state_dir} is running (process {pid}); stop it with "
                         f"`dlops stop --state-dir {options.state_dir}`, or give another --state-dir")  # fmt: skip
    if not options.auth and options.inference_address != "127.0.0.1":
        raise ServeError(f"the inference API would listen on {options.inference_address} without a key: "
                         "publishing it needs token authorization (drop --no-auth)")  # fmt: skip
    published = [f"--{api}-address {address}" for api, address in
                 (("inference", options.inference_address), ("metrics", options.metrics_address))
                 if address not in LOOPBACK]  # fmt: skip
    if published and not options.tls and not options.insecure_http:
        raise ServeError(f"{' and '.join(published)} would send keys and requests over the network in clear: give "
                         "--tls-cert/--tls-key, or --tls auto (a CA and certificate made for this server), or say "
                         "--insecure-http on purpose")  # fmt: skip
    worker_socket = options.state_dir.resolve() / "tmp" / ".ts.sock.65535"  # in its TMPDIR: see _environment
    if len(str(worker_socket)) > UNIX_SOCKET_MAX:
        raise ServeError(f"--state-dir {options.state_dir.resolve()} is too long a path: TorchServe's workers talk "
                         f"over Unix sockets in its tmp/ folder, whose paths may not pass {UNIX_SOCKET_MAX} characters "
                         f"({len(str(worker_socket))} here); choose a shorter one")  # fmt: skip
    busy = [f"{name} port {port}" for name, port in options.ports.items() if _port_in_use(port)]
    if busy:
        raise ServeError(f"{', '.join(busy)} already in use on 127.0.0.1 (another server?); choose other ports")
    if not mars and not allow_empty:
        raise ServeError(f"no .mar files to serve in {options.model_store}: `dlops package resnet|lm ...`, or "
                         "`dlops serve --model models:/NAME@ALIAS`")  # fmt: skip
    names = [mar_identity(mar)[0] for mar in mars]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ServeError(f"more than one .mar of model {twice[0]!r} to load; serve one version of each model")


def executable(name: str) -> str:
    """A command installed with this Python's packages (torchserve, torch-model-archiver, mlflow): beside
    the interpreter in a virtualenv, else on PATH."""
    beside = Path(sys.executable).with_name(name)
    found = str(beside) if beside.is_file() else shutil.which(name)
    if found is None:
        raise ServeError(f"{name} was found neither beside {sys.executable} nor on PATH: install dlops with its "
                         "dependencies (pip install dlops) in this environment")  # fmt: skip
    return found


def start(options: ServeOptions, mars: list[Path], *, allow_empty: bool = False) -> ServerClient:
    """Start TorchServe in the background with `mars` (files of the model store); wait until every
    worker is READY; start the key keeper. Return a client of the new server. `allow_empty`: a
    server with no model yet, which `dlops deploy` fills (the container's start)."""
    _check_can_start(options, mars, allow_empty=allow_empty)
    state = private_dir(options.state_dir.resolve())  # its keys, config and logs: the owner's only
    for folder in ("logs", "tmp"):
        (state / folder).mkdir(parents=True, exist_ok=True)
    (state / "key_file.json").unlink(missing_ok=True)
    if options.sockets:  # owner-only: whoever can open the folder may call the APIs; a dead server's sockets go
        private_dir(Path(options.sockets).resolve())
        for api in ("inference", "management"):
            options.socket(api).unlink(missing_ok=True)
    config = state / "config.properties"
    config.write_text("".join(f"{k}={v}\n" for k, v in effective_config(options, mars).items()), encoding="utf-8")
    command = [executable("torchserve"), "--start", "--ts-config", str(config), "--model-store",
               str(options.model_store.resolve()), "--ncs"]  # fmt: skip
    if not options.auth:
        command.append("--disable-token-auth")
    log_offset = log_size(state / MODEL_LOG)  # a restart appends to the last server's log
    # The launcher leaves Java running with its output: send it to a file, not a pipe we would wait on.
    launch_log = state / "logs" / "launcher.log"
    with launch_log.open("w") as out:
        # umask 077: what TorchServe writes (the key file it rewrites on every renewal, unpacked archives,
        # logs) is its owner's only
        returncode = subprocess.run(command, cwd=state, env=_environment(state, options), stdout=out,
                                    stderr=subprocess.STDOUT, umask=0o077).returncode  # fmt: skip
    said = launch_log.read_text(errors="replace")
    pid = running_pid(state)
    if returncode != 0 or pid is None:
        raise ServeError(f"torchserve did not start: {said.strip()[-2000:]}")
    urls = api_urls(options)
    record = {"pid": pid, "urls": urls, "model_store": str(options.model_store.resolve()), "ca": _trusted_ca(options),
              "options": {k: str(v) for k, v in asdict(options).items()}}  # fmt: skip
    (state / SERVER_FILE).write_text(json.dumps(record, indent=1), encoding="utf-8")
    client = ServerClient.of(state)
    try:
        wait_listening(client, timeout_s=options.timeout_s, pid=pid)
        for mar in mars:
            wait_ready(client, *mar_identity(mar), timeout_s=options.timeout_s, log_offset=log_offset)
    except ServeError:
        stop(state)
        raise
    if options.auth:
        _start_keeper(state, urls["management"], pid)
    _say_started(options, urls, mars, state)
    return client


def _trusted_ca(options: ServeOptions) -> str | None:
    """What this machine's clients check the certificate against, as server.json records it: a path
    relative to the state dir when it lies there (a container's state dir is the host's bind mount)."""
    trusted = options.tls_ca or options.tls_cert
    if trusted is None:
        return None
    path, state = Path(trusted).resolve(), options.state_dir.resolve()
    return str(path.relative_to(state)) if state in path.parents else str(path)


def _say_started(options: ServeOptions, urls: dict[str, str], mars: list[Path], state: Path) -> None:
    print(f"=> TorchServe is up: inference {urls['inference']}, management {urls['management']}, "
          f"metrics {urls['metrics']}; state dir {state}")  # fmt: skip
    published = {api: getattr(options, f"{api}_address") for api in ("inference", "metrics")}
    for api, address in published.items():
        if address != "127.0.0.1":
            print(f"=> the {api} API listens on {address}:{getattr(options, f'{api}_port')}"
                  + (" over TLS" if options.tls else " in clear (--insecure-http)")
                  + (" (with its key: `dlops keys show` prints it for teammates)" if options.auth and
                     api == "inference" else ""))  # fmt: skip
    if options.tls_ca:
        print(f"=> TLS with the stack's own CA: clients elsewhere trust {Path(options.tls_ca).resolve()} (`dlops "
              "predict --ca`, or REQUESTS_CA_BUNDLE)")  # fmt: skip
    print(f"=> models: {', '.join('{} version {}'.format(*mar_identity(m)) for m in mars)}; logs in {state / 'logs'}")
    if read_keys(state):
        print(f"=> token authorization is on; keys in {state / 'key_file.json'} (valid "
              f"{options.token_expiration_min:g} min, renewed at half-life while the server runs)")  # fmt: skip


def _start_keeper(state: Path, management_url: str, server_pid: int) -> None:
    """The key keeper, detached: it outlives this command and ends with the server."""
    with (state / "logs" / "keys.log").open("a") as log:
        keeper = subprocess.Popen(
            [sys.executable, str(Path(__file__).with_name("keys.py")), "keep", "--state-dir", str(state),
             "--management-url", management_url, "--server-pid", str(server_pid)],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
            env=child_environment("torchserve"),
        )  # fmt: skip
    (state / "keeper.pid").write_text(str(keeper.pid))


def workers(client: ServerClient, model: str, version: str | None = None) -> list[dict]:
    """The workers of a model version (the default version when None), as TorchServe describes them."""
    answer = client.management("GET", f"/models/{model}" + (f"/{version}" if version else ""), timeout_s=10)
    if not answer.ok or not isinstance(answer.data, list) or not answer.data:
        return []
    return answer.data[0].get("workers", [])


def _poll(ready: Callable[[], bool], timeout_s: float) -> bool:
    """Ask `ready` every half second until it says yes (True) or `timeout_s` passes (False); a server
    not listening yet (OSError) or its key file caught half written is not ready yet."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, KeyFileError):
            if ready():
                return True
        time.sleep(0.5)
    return False


def wait_listening(client: ServerClient, timeout_s: float, pid: int | None = None) -> None:
    """Poll until the management API answers with the server's keys (a server with no model yet has no
    worker to wait for); stop at once when the server's process `pid` has ended (it says why in its log)."""

    def listening() -> bool:
        if pid is not None and not process_alive(pid):
            said = (client.state_dir / "logs" / "launcher.log").read_text(errors="replace")
            cause = [line for line in said.splitlines() if "Exception" in line or "Error" in line][-1:]
            raise ServeError(f"TorchServe exited while starting: {' '.join(cause) or 'see its log'}; see "
                             f"{client.state_dir / 'logs' / 'launcher.log'}")  # fmt: skip
        return client.management("GET", "/models", timeout_s=10).ok

    if not _poll(listening, timeout_s):
        raise ServeError(f"TorchServe did not answer within {timeout_s:.0f} s; see {client.state_dir / 'logs'}")


def model_log(client: ServerClient) -> Path | None:
    """TorchServe's log of what its Python workers print (None for a server on another machine)."""
    return client.state_dir / MODEL_LOG if client.state_dir else None


def log_size(log: Path | None) -> int:
    """Where a log ends now: a failure is looked for only in what is written after it."""
    return log.stat().st_size if log and log.is_file() else 0


def load_failure(log: Path | None, model: str, version: str, since: int = 0) -> str | None:
    """The exception that stopped a worker of `model` `version` from loading, as the model log has it past
    byte `since` (None while there is none). An asynchronously registered version whose workers fail is
    restarted by TorchServe again and again, and its describe answer never says why: the log does."""
    if log is None or not log.is_file():
        return None
    thread = f"-{model}_{version}-stdout MODEL_LOG - "  # TorchServe names worker threads W-<port>-<model>_<version>
    failed = False
    with log.open(errors="replace") as lines:
        lines.seek(since)
        for line in lines:
            if thread not in line:
                continue
            message = line.split(thread, 1)[1].rstrip()
            if message.startswith(f"Failed to load model {model}"):
                failed = True
            elif failed and message and not message.startswith((" ", "Traceback")):
                return message  # the traceback's last line: the exception and its message
    return None


def wait_ready(client: ServerClient, model: str, version: str, timeout_s: float, *, log_offset: int = 0) -> None:
    """Poll until every worker of `model` `version` is READY; stop at the first failure to load that the
    model log shows past `log_offset`."""
    log = model_log(client)

    def all_ready() -> bool:
        if (failure := load_failure(log, model, version, since=log_offset)) is not None:
            raise ServeError(f"the worker of model {model} version {version} failed to load: {failure}; see {log}")
        found = workers(client, model, version)
        return bool(found) and all(w["status"] == "READY" for w in found)

    if not _poll(all_ready, timeout_s):
        raise ServeError(f"model {model} version {version} not ready after {timeout_s:.0f} s; see {log}")


def stop(state_dir: Path, timeout_s: float = 60.0) -> str:
    """Stop the TorchServe (and its key keeper) started from `state_dir`; leave every other one alone."""
    state = Path(state_dir).resolve()
    keeper = state / "keeper.pid"
    if keeper.is_file():
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(keeper.read_text()), signal.SIGTERM)
        keeper.unlink(missing_ok=True)
    pid = running_pid(state)
    if pid is None:
        return f"no TorchServe is running from {state}"
    env = child_environment("torchserve", extra={"TMPDIR": str(state / "tmp"), "TEMP": str(state / "tmp")})
    result = subprocess.run([executable("torchserve"), "--stop"], cwd=state, env=env, capture_output=True,
                            text=True, timeout=timeout_s)  # fmt: skip
    deadline = time.monotonic() + timeout_s
    while process_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    return (result.stdout + result.stderr).strip() + f" (state dir {state})"


def server_record(state_dir: Path) -> dict:
    """What `dlops serve` recorded about the server of `state_dir` ({} when it never started)."""
    return read_server_file(state_dir)
