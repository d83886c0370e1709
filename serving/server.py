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

from serving.client import SERVER_FILE, ServerClient, read_server_file
from serving.keys import KeyFileError, process_alive, read_keys

CONFIG_TEMPLATE = Path(__file__).resolve().parent / "config.properties"
METRICS_CONFIG = Path(__file__).resolve().parent / "metrics.yaml"  # TorchServe's metrics plus our handlers' counters
JAVA_HINT = "TorchServe needs Java 17: sudo apt-get install -y openjdk-17-jre-headless"
PID_FILE = ".model_server.pid"  # TorchServe's launcher: tempfile.gettempdir() / this
DEFAULT_STATE_DIR = Path("logs/torchserve")
MODEL_LOG = Path("logs") / "model_log.log"  # in a state dir: what TorchServe's Python workers print
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
    timeout_s: float = 180.0
    # Where each API listens: loopback unless published on request. The management API is never
    # published, except from inside a container (management_address 0.0.0.0, the container's own
    # interface), whose runtime publishes it on the host's 127.0.0.1 only (docker/compose.yaml).
    inference_address: str = "127.0.0.1"
    metrics_address: str = "127.0.0.1"
    management_address: str = "127.0.0.1"

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
        return {"inference": self.inference_port, "management": self.management_port, "metrics": self.metrics_port,
                "gRPC inference": self.grpc_inference_port, "gRPC management": self.grpc_management_port}  # fmt: skip


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


def local_url(address: str, port: int) -> str:
    """How a client on this machine reaches an API bound to `address` (any-address: over loopback)."""
    return f"http://{_url_host('127.0.0.1' if address in ('0.0.0.0', '::') else address)}:{port}"  # noqa: S104


def effective_config(options: ServeOptions, mars: list[Path]) -> dict[str, str]:
    """The template's settings with this server's ports, paths, auth and key lifetime."""
    props = read_properties(CONFIG_TEMPLATE)
    store = options.model_store.resolve()
    props.update(
        {
            "inference_address": f"http://{_url_host(options.inference_address)}:{options.inference_port}",
            "management_address": f"http://{_url_host(options.management_address)}:{options.management_port}",
            "metrics_address": f"http://{_url_host(options.metrics_address)}:{options.metrics_port}",
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


def _environment(state: Path, options: ServeOptions) -> dict[str, str]:
    return {
        **os.environ,
        "TMPDIR": str(state / "tmp"),  # the launcher's PID file: one per state dir, not one per machine
        "TEMP": str(state / "tmp"),  # the JVM's temp folder (unpacked archives)
        "LOG_LOCATION": str(state / "logs"),
        "METRICS_LOCATION": str(state / "logs"),
        "DLOPS_TORCH_THREADS": str(options.torch_threads),
        "DLOPS_SERVE_AMP": options.amp,
    }


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
    state = options.state_dir.resolve()
    for folder in ("logs", "tmp"):
        (state / folder).mkdir(parents=True, exist_ok=True)
    (state / "key_file.json").unlink(missing_ok=True)
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
        returncode = subprocess.run(command, cwd=state, env=_environment(state, options), stdout=out,
                                    stderr=subprocess.STDOUT).returncode  # fmt: skip
    said = launch_log.read_text(errors="replace")
    pid = running_pid(state)
    if returncode != 0 or pid is None:
        raise ServeError(f"torchserve did not start: {said.strip()[-2000:]}")
    urls = {api: local_url(getattr(options, f"{api}_address"), getattr(options, f"{api}_port"))
            for api in ("inference", "management", "metrics")}  # fmt: skip
    record = {"pid": pid, "urls": urls, "model_store": str(options.model_store.resolve()),
              "options": {k: str(v) for k, v in asdict(options).items()}}  # fmt: skip
    (state / SERVER_FILE).write_text(json.dumps(record, indent=1), encoding="utf-8")
    client = ServerClient.of(state)
    try:
        wait_listening(client, timeout_s=options.timeout_s)
        for mar in mars:
            wait_ready(client, *mar_identity(mar), timeout_s=options.timeout_s, log_offset=log_offset)
    except ServeError:
        stop(state)
        raise
    if options.auth:
        _start_keeper(state, urls["management"], pid)
    print(f"=> TorchServe is up: inference {urls['inference']}, management {urls['management']}, "
          f"metrics {urls['metrics']}; state dir {state}")  # fmt: skip
    published = {api: getattr(options, f"{api}_address") for api in ("inference", "metrics")}
    for api, address in published.items():
        if address != "127.0.0.1":
            print(f"=> the {api} API listens on {address}:{getattr(options, f'{api}_port')}"
                  + (" (with its key: `dlops keys show` prints it for teammates)" if options.auth and
                     api == "inference" else ""))  # fmt: skip
    print(f"=> models: {', '.join('{} version {}'.format(*mar_identity(m)) for m in mars)}; logs in {state / 'logs'}")
    if read_keys(state):
        print(f"=> token authorization is on; keys in {state / 'key_file.json'} (valid "
              f"{options.token_expiration_min:g} min, renewed at half-life while the server runs)")  # fmt: skip
    return client


def _start_keeper(state: Path, management_url: str, server_pid: int) -> None:
    """The key keeper, detached: it outlives this command and ends with the server."""
    with (state / "logs" / "keys.log").open("a") as log:
        keeper = subprocess.Popen(
            [sys.executable, str(Path(__file__).with_name("keys.py")), "keep", "--state-dir", str(state),
             "--management-url", management_url, "--server-pid", str(server_pid)],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
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


def wait_listening(client: ServerClient, timeout_s: float) -> None:
    """Poll until the management API answers with the server's keys (a server with no model yet has no
    worker to wait for)."""
    if not _poll(lambda: client.management("GET", "/models", timeout_s=10).ok, timeout_s):
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
    env = {**os.environ, "TMPDIR": str(state / "tmp"), "TEMP": str(state / "tmp")}
    result = subprocess.run([executable("torchserve"), "--stop"], cwd=state, env=env, capture_output=True,
                            text=True, timeout=timeout_s)  # fmt: skip
    deadline = time.monotonic() + timeout_s
    while process_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    return (result.stdout + result.stderr).strip() + f" (state dir {state})"


def server_record(state_dir: Path) -> dict:
    """What `dlops serve` recorded about the server of `state_dir` ({} when it never started)."""
    return read_server_file(state_dir)
