"""`make docker-check`: build both images, start the compose stack, and run the team's loop across it.

    the stack's secrets are made (the admin's and PostgreSQL's passwords, a CA and a certificate for
    every name: `dlops tls init`) -> MLflow and TorchServe answer over TLS only, and PostgreSQL is out
    of TorchServe's reach -> the MLflow server starts with logins -> the admin adds a
    teammate with editor rights -> train as that teammate (in the trainer container, against the
    MLflow server on PostgreSQL; the MLflow container is restarted once mid-training) -> registered
    MLflow model -> the same job across 2 trainer containers (nodes) through torchrun's rendezvous,
    one killed mid-epoch (SIGKILL) and started again: the one run resumed and finished ->
    `dlops deploy` from the host to the running TorchServe container (no restart) ->
    a classification and a generation request from the host on 127.0.0.1 with the server's key ->
    the val images classified: the stack's Prometheus counts them per version, and a drift check of the
    prediction log (written by the container into its state dir) against the version's reference
    profile is logged to MLflow ->
    a fleet (the gateway, HAProxy, in front of 2 TorchServe containers, all driven from the host through
    their shared folder): the ResNet deployed to both, a canary promoted, a canary failing 5% of its
    requests aborted, under load through the gateway -> from a teammate's machine (the `client`
    service: another container on the compose network, not the host) a run logged with the teammate's
    login and a prediction with the handed-over key; the same without the login gets 401 from MLflow,
    without the key a 4xx from TorchServe -> the trainer container writes a report -> everything torn
    down, volumes too.

Each step prints its time; the last line sums it up. Needs a Docker engine (started here when it is
installed but not running and this runs as root), `docker compose` or Debian's `docker-compose`,
and the project's venv (the host side: data, deploy, requests). Base images: the official ones when
they can be pulled, else the stand-ins `docker/bases.sh` builds from Debian's packages. pip in the
builds uses the host's pip index settings and CA bundle (docker/Dockerfile.train says how).
The stack publishes 127.0.0.1:5000 (MLflow), 8080-8082 (TorchServe), 8090 (the fleet's gateway) and 9090
(Prometheus): they must be free.
"""

from __future__ import annotations

import http.client
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from contextlib import contextmanager
from pathlib import Path

from serving import environment
from serving.client import VERSION_HEADER, ServerClient
from serving.secrets import private_dir
from serving.tls import machine_hosts, urlopen

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # tests/ is no installed package: its faulty archives are imported from the checkout

from tests.faults import rewrite_archive  # noqa: E402 - the same faults the tests inject
from tests.load import Load  # noqa: E402
from training.tracking.tags import RESTARTS  # noqa: E402

DOCKER = REPO / "docker"
STATE = DOCKER / "state"
PROJECT = "dlops-check"
OFFICIAL = {
    "python": "python:3.11.7-slim-bookworm@sha256:cfd7ed5c11a88ce533d69a1da2fd932d647f9eb6791c5b4ddce081aedf7f7876",
    "postgres": "postgres:16-bookworm@sha256:efedf3595f1d6f415c08568ba171029bf54052e754cc9f030e3f2412b21f3d67",
}
STAND_INS = {"python": "local/bookworm-python:3.11", "postgres": "local/postgres:15-bookworm"}
PORTS = (5000, 8080, 8081, 8082, 8090, 9090)
# the variables docker/compose.yaml substitutes (its ${...}), set by this check
PYTHON_BASE, POSTGRES_IMAGE, DATA_DIR, STATE_DIR = "PYTHON_BASE", "POSTGRES_IMAGE", "DATA_DIR", "DLOPS_STATE"
ADMIN_PASSWORD_FILE, POSTGRES_PASSWORD_FILE = "MLFLOW_ADMIN_PASSWORD_FILE", "POSTGRES_PASSWORD_FILE"
TLS_DIR, LOG_SAMPLE = "TLS_DIR", "LOG_SAMPLE"
FLEET_DIR, FLEET_MODEL_STORE = "FLEET_DIR", "FLEET_MODEL_STORE"
times: dict[str, float] = {}


class CheckFailed(RuntimeError):
    pass


@contextmanager
def step(name: str):
    print(f"\n=== {name}", flush=True)
    start = time.perf_counter()
    yield
    times[name] = time.perf_counter() - start
    print(f"=== {name}: {times[name]:.1f} s", flush=True)


def sh(*command: str, check: bool = True, capture: bool = False, env: dict | None = None, timeout: float = 3600,
       cwd: Path = REPO) -> subprocess.CompletedProcess:  # fmt: skip
    result = subprocess.run(list(command), cwd=cwd, env={**os.environ, **(env or {})}, text=True, timeout=timeout,
                            capture_output=capture)  # fmt: skip
    if check and result.returncode != 0:
        said = (result.stdout or "")[-3000:] + (result.stderr or "")[-3000:] if capture else ""
        raise CheckFailed(f"{' '.join(command[:6])} ... exited {result.returncode}\n{said}")
    return result


def engine() -> None:
    """A running Docker engine: found, or started here (root, dockerd installed), or a clear failure."""
    if shutil.which("docker") is None:
        raise CheckFailed("no docker command: apt-get install -y docker.io (it brings dockerd too)")
    if sh("docker", "info", check=False, capture=True).returncode == 0:
        return
    if os.geteuid() != 0 or shutil.which("dockerd") is None:
        raise CheckFailed("no Docker engine is running: start dockerd (as root: `dockerd &`), or install it with "
                          "apt-get install -y docker.io")  # fmt: skip
    print("=> starting dockerd (log: /tmp/dlops-dockerd.log)", flush=True)
    with open("/tmp/dlops-dockerd.log", "a") as log:
        subprocess.Popen(["dockerd"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    for _ in range(60):
        if sh("docker", "info", check=False, capture=True).returncode == 0:
            return
        time.sleep(1)
    raise CheckFailed("dockerd did not come up in 60 s: see /tmp/dlops-dockerd.log")


def compose_command() -> list[str]:
    if sh("docker", "compose", "version", check=False, capture=True).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    raise CheckFailed("neither `docker compose` nor docker-compose: apt-get install -y docker-compose")


def base_images() -> dict[str, str]:
    """PYTHON_BASE and POSTGRES_IMAGE when given; else the official base images (pinned by digest) when
    they can be pulled, else the stand-ins built from Debian packages."""
    given = {"python": os.environ.get(PYTHON_BASE), "postgres": os.environ.get(POSTGRES_IMAGE)}
    if given["python"] and given["postgres"]:
        print(f"=> base images as given: {given['python']}, {given['postgres']}", flush=True)
        return given
    pulled = all(sh("docker", "pull", "-q", image, check=False, capture=True, timeout=120).returncode == 0
                 for image in OFFICIAL.values())  # fmt: skip
    if pulled:
        return dict(OFFICIAL)
    print("=> the official base images cannot be pulled here: building stand-ins from Debian packages", flush=True)
    sh("bash", str(DOCKER / "bases.sh"))
    return dict(STAND_INS)


def pip_ca_bundle() -> None:
    """The host's pip CA bundle (a proxy's or mirror's CA) for the builds: docker/build-ca/ca.crt."""
    cert = os.environ.get("PIP_CERT") or sh(sys.executable, "-m", "pip", "config", "get", "global.cert",
                                            check=False, capture=True).stdout.strip()  # fmt: skip
    target = DOCKER / "build-ca" / "ca.crt"
    if cert and Path(cert).is_file():
        shutil.copy(cert, target)
        print(f"=> pip in the builds trusts {cert}", flush=True)
    else:
        target.unlink(missing_ok=True)


def build(bases: dict[str, str]) -> dict[str, float]:
    sizes = {}
    for name in ("train", "serve"):
        sh("docker", "build", "--network", "host", "-f", str(DOCKER / f"Dockerfile.{name}"), "-t",
           f"dlops/{name}:latest", "--build-arg", f"BASE={bases['python']}", str(REPO))  # fmt: skip
        size = sh("docker", "image", "inspect", "-f", "{{.Size}}", f"dlops/{name}:latest", capture=True).stdout
        sizes[name] = int(size.strip()) / 1e9
        print(f"=> dlops/{name}:latest: {sizes[name]:.2f} GB", flush=True)
    return sizes


def wait_http(url: str, timeout_s: float, what: str, ca: Path | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urlopen(url, timeout=5, cafile=ca):
                return
        except urllib.error.HTTPError:
            return  # it answers
        except OSError:
            time.sleep(1)
    raise CheckFailed(f"{what} did not answer at {url} within {timeout_s:.0f} s")


def dlops(*args: str, env: dict | None = None, capture: bool = False) -> subprocess.CompletedProcess:
    return sh(sys.executable, "-m", "training.cli", *args, env=env, capture=capture)


def stack_secrets(folder: Path) -> tuple[str, dict[str, str]]:
    """The secrets compose reads (docs/team.md): the MLflow admin's password (read by the tracking server,
    uid 1000), PostgreSQL's (read by it and by PostgreSQL's own user), and the stack's CA and certificate
    for every name clients use (the key read by MLflow and TorchServe, both uid 1000), in an owner-only
    folder. Returns the admin's password and the variables that point compose at them."""
    folder = private_dir(folder)
    admin = secrets.token_urlsafe(18)
    for name, value, owner, mode in (("mlflow_admin_password", admin, 1000, 0o600),
                                     ("postgres_password", secrets.token_urlsafe(18), 0, 0o644)):  # fmt: skip
        (folder / name).write_text(value + "\n")
        os.chown(folder / name, owner, owner)
        (folder / name).chmod(mode)
    dlops("tls", "init", str(folder / "tls"), "--name", "mlflow", "--name", "torchserve")
    os.chown(folder / "tls" / "server.key", 1000, 1000)
    return admin, {
        ADMIN_PASSWORD_FILE: str(folder / "mlflow_admin_password"),
        POSTGRES_PASSWORD_FILE: str(folder / "postgres_password"),
        TLS_DIR: str(folder / "tls"),
    }


def tls_and_networks(compose: list[str], env: dict, ca: Path) -> None:
    """Plain HTTP is not answered where TLS is on; TorchServe cannot even resolve PostgreSQL's name."""
    for url in ("http://127.0.0.1:5000/health", "http://127.0.0.1:8080/ping"):
        try:
            with urllib.request.urlopen(url, timeout=5):  # noqa: S310 - loopback
                raise CheckFailed(f"{url} answered plain HTTP")
        except urllib.error.HTTPError as e:  # TorchServe refuses in HTTP; anything else would be served
            said = e.read().decode(errors="replace")
            if e.code != 403 or "only accepts HTTPS" not in said:
                raise CheckFailed(f"{url} answered plain HTTP with {e.code}: {said[:200]}") from e
            print(f"=> plain HTTP refused at {url}: {e.code} {' '.join(said.split())[:80]}")
        except (OSError, http.client.HTTPException) as e:
            print(f"=> plain HTTP refused at {url}: {type(e).__name__}")
    with urlopen("https://127.0.0.1:5000/health", timeout=10, cafile=ca):
        print("=> MLflow answers over TLS to a client that trusts the stack's CA")
    probe = "import socket; socket.create_connection(('postgres', 5432), timeout=5)"
    reached = sh(*compose, "exec", "-T", "torchserve", "python3", "-c", probe, env=env, capture=True, check=False)
    if reached.returncode == 0:
        raise CheckFailed("the TorchServe container reached PostgreSQL")
    print(f"=> PostgreSQL is out of TorchServe's reach: {(reached.stderr or '').strip().splitlines()[-1][:120]}")


def refused(result: subprocess.CompletedProcess, *needles: str) -> str:
    """A command that had to fail, saying why: its output, or CheckFailed."""
    said = (result.stdout or "") + (result.stderr or "")
    if result.returncode == 0 or not all(needle in said for needle in needles):
        raise CheckFailed(f"expected a refusal saying {needles}, got exit {result.returncode}:\n{said[-2000:]}")
    return said


def team_check(compose: list[str], env: dict, host_env: dict, image: str) -> None:
    """From the `client` container (another machine on the compose network, not the host): a run with
    the teammate's login, a prediction with the handed-over inference key; without either, refused."""
    key = dlops("keys", "show", "--state-dir", str(STATE / "torchserve"), capture=True).stdout.strip()
    client = [*compose, "run", "--rm"]
    train = ["train", "lm", "/data/corpus", "--epochs", "1", "--emsize", "16", "--nhid", "16", "--run-name"]
    sh(*client, "client", *train, "from-a-teammate", env=env)
    script = (
        "from mlflow import MlflowClient; c = MlflowClient(); "
        "r = c.search_runs([c.get_experiment_by_name('wordlm-wikitext2').experiment_id], "
        "\"tags.mlflow.runName = 'from-a-teammate'\")[0]; print(r.info.status, r.data.tags['mlflow.user'])"
    )
    status_user = sh(sys.executable, "-c", script, env=host_env, capture=True).stdout.split()
    if status_user != ["FINISHED", "bob"]:
        raise CheckFailed(f"the teammate's run is {status_user}, expected FINISHED by bob")
    predict = ["client", "predict", f"/data/images/val/images/{image}", "--field", "topk=1"]
    answer = sh(*client, "-e", f"{environment.INFERENCE_KEY}={key}", *predict, env=env, capture=True).stdout
    top = json.loads(answer[answer.index("[") :])[0]
    print(f"=> the client container, with the handed-over key: {top['class']} ({top['probability']:.3f})")
    no_login = ["-e", f"{environment.TRACKING_USERNAME}=", "-e", f"{environment.TRACKING_PASSWORD}="]
    said = refused(sh(*client, *no_login, "client", *train, "no-login", env=env, capture=True, check=False),
                   "HTTP 401")  # fmt: skip
    print(f"=> without a login MLflow refused: {next(x for x in said.splitlines() if 'HTTP 401' in x)[:160]}")
    said = refused(sh(*client, "-e", f"{environment.INFERENCE_KEY}=", *predict, env=env, capture=True, check=False),
                   "refused the inference key", "HTTP 4")  # fmt: skip
    print(f"=> without the key TorchServe refused: {next(x for x in said.splitlines() if 'refused' in x)[:160]}")


def monitoring_check(compose: list[str], env: dict, dlops_env: dict, val_images: Path, tmp: Path) -> None:
    """The stack's Prometheus scrapes TorchServe over TLS and counts the host's requests per version; the
    prediction log (the state dir, written by the container) feeds a drift check of the deployed ResNet
    against its reference profile (recorded by the trainer container), logged to MLflow."""
    state = STATE / "torchserve"
    client = ServerClient.of(state)
    images = sorted(val_images.iterdir())
    answers = [client.predict_file("resnet", path) for path in images]
    if {a.status for a in answers} != {200}:
        raise CheckFailed(f"the val images were answered {sorted({a.status for a in answers})}")
    version = answers[0].headers[VERSION_HEADER]
    sh(*compose, "up", "-d", "prometheus", env=env)
    query = "http://127.0.0.1:9090/api/v1/query?query=" + urllib.parse.quote('dlops:requests:total{ModelName="resnet"}')
    deadline, counted = time.monotonic() + 120, {}
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(query, timeout=5) as answer:
                counted = {r["metric"]["Version"]: float(r["value"][1]) for r in json.load(answer)["data"]["result"]}
        except OSError:
            counted = {}
        if counted.get(version, 0) >= len(answers):
            break
        time.sleep(2)
    else:
        raise CheckFailed(f"Prometheus counted {counted} resnet requests, the host sent {len(answers)} to {version}")
    logged = sum(1 for _ in (state / "predictions" / "resnet" / version).glob("predictions-*.jsonl"))
    said = sh(sys.executable, "-m", "training.cli", "monitor", "drift", f"models:/resnet-tinyimagenet/{version}",
              "--window", "30m", "--state-dir", str(state), "--report-dir", str(tmp / "drift-report"), check=False,
              capture=True, env=dlops_env)  # fmt: skip
    if said.returncode not in (0, 1):  # a verdict: no drift or drift
        raise CheckFailed(f"the drift check failed ({said.returncode}):\n{said.stdout[-2000:]}{said.stderr[-2000:]}")
    print(
        f"=> Prometheus counted {counted[version]:.0f} requests of resnet version {version} (the host sent "
        f"{len(answers)} and a few more); {logged} log file(s); {said.stdout.strip().splitlines()[-1]}"
    )


def nodes_check(compose: list[str], env: dict, dlops_env: dict) -> None:
    """Two trainer containers (nodes) through torchrun's c10d rendezvous; trainer-1 SIGKILLed mid-epoch (its
    container) and started again, as a scheduler replaces a node: the one run resumes and finishes, every
    epoch logged once, both nodes' system metrics in it."""
    epochs, run_id = 3, f"docker-check-nodes-{int(time.time())}"
    nodes_env = {**env, "NODES_DATA": "/data/images", "NODES_RUN_ID": run_id,
                 "NODES_ARGS": f"--epochs {epochs} -b 32 -j 0 --lr 0.02 -p 1 --checkpoint-every 2 "
                               f"--experiment docker-nodes --run-name {run_id}"}  # fmt: skip
    nodes = [*compose, "--profile", "nodes"]
    sh(*nodes, "up", "-d", "trainer-0", "trainer-1", env=nodes_env)
    ids = {n: sh(*nodes, "ps", "-q", n, env=nodes_env, capture=True).stdout.strip() for n in ("trainer-0", "trainer-1")}
    deadline = time.monotonic() + 600
    while "Epoch: [2]" not in (said := sh(*nodes, "logs", env=nodes_env, capture=True).stdout):
        if time.monotonic() > deadline:
            raise CheckFailed(f"the nodes never reached epoch 2:\n{said[-3000:]}")
        time.sleep(2)
    sh("docker", "kill", "--signal", "KILL", ids["trainer-1"])
    print("=> trainer-1 killed (SIGKILL) mid-epoch 2; starting it again", flush=True)
    time.sleep(3)
    sh("docker", "start", ids["trainer-1"])
    codes = {n: sh("docker", "wait", i, capture=True, timeout=900).stdout.strip() for n, i in ids.items()}
    said = sh(*nodes, "logs", env=nodes_env, capture=True).stdout
    print("".join(f"   | {line}\n" for line in said.splitlines() if line.split("|")[-1].lstrip().startswith("=>")))
    if set(codes.values()) != {"0"}:
        raise CheckFailed(f"the nodes exited {codes}:\n{said[-4000:]}")
    script = f"""
import json
from mlflow import MlflowClient
c = MlflowClient()
r = c.search_runs([c.get_experiment_by_name("docker-nodes").experiment_id], "tags.mlflow.runName = '{run_id}'")[0]
print(json.dumps({{"status": r.info.status, "restart_count": r.data.tags.get({RESTARTS!r}),
                  "nodes": r.data.params.get("nodes"),
                  "epochs": sorted(m.step for m in c.get_metric_history(r.info.run_id, "val/acc1")),
                  "system": sorted({{k.split("/")[1] for k in r.data.metrics if k.startswith("system/")}})}}))
"""
    found = json.loads(sh(sys.executable, "-c", script, env=dlops_env, capture=True).stdout)
    expected = {"status": "FINISHED", "restart_count": "1", "nodes": "2", "epochs": list(range(1, epochs + 1)),
                "system": ["trainer-0", "trainer-1"]}  # fmt: skip
    if found != expected:
        raise CheckFailed(f"the two-node run: {found}, expected {expected}")
    print(f"=> one run across 2 nodes, resumed after trainer-1 was killed: {found}", flush=True)


def fleet_check(compose: list[str], env: dict, dlops_env: dict, image: Path, tmp: Path) -> None:
    """The gateway and two servers in containers, driven from the host through the shared folder: the ResNet
    deployed to both, a canary of the same weights promoted, one failing 5% of requests aborted."""
    fleet, store = STATE / "fleet", STATE / "fleet-store"
    sh(*compose, "--profile", "fleet", "up", "-d", "fleet-1", "fleet-2", "gateway", env=env)
    deadline = time.monotonic() + 300
    while not (fleet / "server.json").is_file() and time.monotonic() < deadline:
        time.sleep(1)
    wait_http("https://127.0.0.1:8090/ping", 60, "the fleet's gateway", fleet / "tls-ca.pem")
    deploy = ("deploy", "--state-dir", str(fleet), "--model-store", str(store))
    dlops(*deploy, "models:/resnet-tinyimagenet/latest", env=dlops_env)
    stable = (fleet / "gateway" / "stable.map").read_text().split()[1]
    policy = tmp / "canary.json"
    policy.write_text(json.dumps({"steps": [50], "interval_s": 3, "min_requests": 60, "max_wait_s": 120}))
    good = rewrite_archive(store / f"resnet-{stable}.mar", tmp / "resnet-again.mar", "again")
    bad = rewrite_archive(store / f"resnet-{stable}.mar", tmp / "resnet-bad.mar", "bad", "errors")
    client, body = ServerClient.of(fleet), image.read_bytes()
    with Load(lambda: client.predict("resnet", body, "application/octet-stream"), concurrency=4) as load:
        time.sleep(2)
        dlops(*deploy, str(good), "--canary", "--policy", str(policy), env=dlops_env)
        aborted = sh(sys.executable, "-m", "training.cli", *deploy, str(bad), "--canary", "--policy", str(policy),
                     env=dlops_env, check=False, capture=True)  # fmt: skip
    said = (aborted.stdout or "") + (aborted.stderr or "")
    if aborted.returncode != 1 or "aborted: step 1 (50%): error rate" not in said:
        raise CheckFailed(f"the faulty canary was not aborted:\n{said[-3000:]}")
    failed = [s.version for s in load.samples if s.status != 200]
    served_by = sorted({s.version for s in load.samples if s.version})
    if set(failed) - {"bad"} or set(served_by) != {"again", "bad", stable}:
        raise CheckFailed(f"requests failed outside the faulty canary ({failed[:5]}) or versions {served_by}")
    reason = next(line for line in said.splitlines() if "aborted" in line)
    print(
        f"=> {len(load.samples)} requests through the gateway, answered by versions {served_by}; "
        f"{len(failed)} failed, all the faulty canary's; {reason[:200]}"
    )


def main() -> int:
    started = time.perf_counter()
    busy = [p for p in PORTS if socket.socket().connect_ex(("127.0.0.1", p)) == 0]
    if busy:
        raise CheckFailed(f"ports {busy} on 127.0.0.1 are in use: the stack publishes 5000, 8080-8082, 8090, 9090")
    with step("engine"):
        engine()
        compose = [*compose_command(), "-p", PROJECT, "-f", str(DOCKER / "compose.yaml")]
    with step("base images"):
        bases = base_images()
    with step("build images"):
        pip_ca_bundle()
        sizes = build(bases)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        dlops("data", "synth", str(data / "images"), "--classes", "8", "--train-per-class", "60", "--val-per-class",
              "10")  # fmt: skip
        dlops("data", "synth-corpus", str(data / "corpus"))
        os.chmod(tmp, 0o755)
        shutil.rmtree(STATE, ignore_errors=True)
        for folder in ("torchserve", "model-store", "fleet", "fleet-store"):
            (STATE / folder).mkdir(parents=True)
            os.chown(STATE / folder, 1000, 1000)  # the serving container's user writes its keys there
        with step("the stack's secrets: passwords, a CA and a certificate"):
            admin_password, secret_files = stack_secrets(Path(tmp) / "secrets")
        ca = Path(secret_files[TLS_DIR]) / "ca.pem"
        env = {
            PYTHON_BASE: bases["python"],
            POSTGRES_IMAGE: bases["postgres"],
            LOG_SAMPLE: "1",  # every request in the prediction log: the drift check has the val set's worth
            DATA_DIR: str(data),
            STATE_DIR: str(STATE),
            FLEET_DIR: str(STATE / "fleet"),
            FLEET_MODEL_STORE: str(STATE / "fleet-store"),
            **secret_files,
            environment.ALLOWED_HOSTS: ",".join(machine_hosts()),
        }
        host = {environment.TRACKING_URI: "https://127.0.0.1:5000", environment.TRACKING_CA: str(ca)}
        admin = {**host, environment.TRACKING_USERNAME: "admin", environment.TRACKING_PASSWORD: admin_password}
        try:
            with step("compose up (postgres, mlflow with logins, torchserve), TLS only"):
                sh(*compose, "up", "-d", "postgres", "mlflow", "torchserve", env=env)
                wait_http("https://127.0.0.1:5000/health", 300, "the MLflow server", ca)
                wait_http("https://127.0.0.1:8080/ping", 300, "TorchServe", ca)
                tls_and_networks(compose, env, ca)
            with step("the admin adds a teammate (editor)"):
                said = dlops("users", "add", "bob", "--role", "editor", env=admin, capture=True).stdout
                teammate = {environment.TRACKING_USERNAME: "bob",
                            environment.TRACKING_PASSWORD: said.split("privately): ")[1].strip()}  # fmt: skip
                env.update(teammate)  # what compose hands the trainer and the client containers
            with step("train in the trainer container, MLflow restarted mid-run"):
                epochs = 6
                trainer = subprocess.Popen(
                    [*compose, "run", "--rm", "trainer", "train", "resnet", "/data/images", "--epochs", str(epochs),
                     "-b", "32", "-j", "0", "--lr", "0.02", "-p", "0", "--run-name", "docker-check"],
                    cwd=REPO, env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                )  # fmt: skip
                seen, restarted = [], False
                for line in trainer.stdout:
                    seen.append(line)
                    print(f"   | {line}", end="", flush=True)
                    if line.startswith("=> epoch saved") and not restarted:
                        sh(*compose, "restart", "mlflow", env=env)
                        restarted = True
                if trainer.wait() != 0 or not restarted:
                    raise CheckFailed("training in the trainer container failed:\n" + "".join(seen[-40:]))
                dlops_env = {**host, **teammate}
                script = ("from mlflow import MlflowClient; c = MlflowClient(); "
                          "r = c.search_runs([c.get_experiment_by_name('resnet-tinyimagenet').experiment_id], "
                          "\"tags.mlflow.runName = 'docker-check'\")[0]; "
                          "print(r.info.status, len(c.get_metric_history(r.info.run_id, 'val/acc1')))")  # fmt: skip
                status, logged = sh(sys.executable, "-c", script, env=dlops_env, capture=True).stdout.split()
                if status != "FINISHED" or int(logged) != epochs:
                    raise CheckFailed(f"the run is {status} with {logged} of {epochs} epochs logged")
                sh(*compose, "run", "--rm", "trainer", "train", "lm", "/data/corpus", "--epochs", "1", "--emsize",
                   "32", "--nhid", "32", "--run-name", "docker-check-lm", env=env)  # fmt: skip
            with step("training across 2 nodes (containers), one killed mid-epoch and started again"):
                nodes_check(compose, env, dlops_env)
            with step("deploy from the host to the running TorchServe container"):
                for uri in ("models:/resnet-tinyimagenet/latest", "models:/wordlm-wikitext2/latest"):
                    dlops("deploy", uri, "--state-dir", str(STATE / "torchserve"), "--model-store",
                          str(STATE / "model-store"), env=dlops_env)  # fmt: skip
            with step("requests from the host with the server's key"):
                image = next((data / "images" / "val" / "images").iterdir())
                answer = dlops("predict", str(image), "--state-dir", str(STATE / "torchserve"), "--field", "topk=3",
                               capture=True).stdout  # fmt: skip
                text = dlops("generate-http", "--state-dir", str(STATE / "torchserve"), "--prompt", "the old cat",
                             "--max-words", "12", "--seed", "1", capture=True).stdout  # fmt: skip
                top = json.loads(answer)[0]
                words = json.loads(text)["words"]
                print(f"=> classified {image.name}: {top['class']} ({top['probability']:.3f}); generated {words} words")
            with step("monitoring: the stack's Prometheus counts the requests, a drift check of the prediction log"):
                monitoring_check(compose, env, dlops_env, data / "images" / "val" / "images", Path(tmp))
            with step("a fleet: the gateway and 2 TorchServe containers, a canary promoted and one aborted"):
                fleet_check(compose, env, dlops_env, image, Path(tmp))
            with step("a teammate's machine: the client container logs a run and asks TorchServe"):
                team_check(compose, env, dlops_env, image.name)
            with step("the trainer container writes a report"):
                said = sh(*compose, "run", "--rm", "trainer", "report", "--experiment", "resnet-tinyimagenet",
                          "--out", "runs/report", env=env, capture=True).stdout  # fmt: skip
                if "=> report of" not in said:
                    raise CheckFailed(f"no report written:\n{said[-2000:]}")
                print(said.strip().splitlines()[-1])
        finally:
            with step("tear down (containers and volumes)"):
                profiles = ["--profile", "tools", "--profile", "fleet", "--profile", "nodes"]
                sh(*compose, *profiles, "down", "-v", "--remove-orphans", check=False, env=env)
                shutil.rmtree(STATE, ignore_errors=True)
    total = time.perf_counter() - started
    print(
        f"\ndocker-check passed in {total:.0f} s: images train {sizes['train']:.2f} GB, serve {sizes['serve']:.2f} "
        f"GB ({bases['python']}); " + "; ".join(f"{name} {seconds:.0f} s" for name, seconds in times.items())
    )
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except CheckFailed as e:
        print(f"docker-check failed: {e}", file=sys.stderr)
        sys.exit(1)
