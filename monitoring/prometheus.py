"""A Prometheus server (Debian's package) that scrapes what `dlops serve` started, and its HTTP API.

    dlops monitor prometheus start --state-dir logs/torchserve     # on 127.0.0.1:9090
    <state dir>/prometheus/prometheus.yml   scrape config: every TorchServe's metrics API (a fleet's
                                            members) and the fleet's gateway (HAProxy's exporter)
    <state dir>/prometheus/rules.yml        recording rules per model version (monitoring/rules.yml)
    <state dir>/prometheus/data/            its time series (kept RETENTION)
    <state dir>/prometheus/prometheus.json  its URL and process id, for `dlops monitor` and stop

The compose stack runs the same image's Prometheus as a service with a config of the same form.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from monitoring import MonitorError
from serving.client import SERVER_FILE, read_server_file
from serving.keys import process_alive
from serving.secrets import child_environment, private_dir

RULES = Path(__file__).resolve().parent / "rules.yml"
FOLDER, RECORD = "prometheus", "prometheus.json"
PROMETHEUS_HINT = "the monitor's time series are Prometheus's: sudo apt-get install -y prometheus"
RETENTION = "15d"
TORCHSERVE_JOB, GATEWAY_JOB = "torchserve", "gateway"


@dataclass(frozen=True, kw_only=True)
class Target:
    job: str  # TORCHSERVE_JOB or GATEWAY_JOB
    url: str  # the metrics API's base URL (http[s]://host:port)
    ca: str | None = None  # the CA its certificate is checked against (TLS)


def prometheus() -> str:
    found = shutil.which("prometheus")
    if found is None:
        raise MonitorError(f"prometheus was not found on PATH. {PROMETHEUS_HINT}")
    return found


def targets(state_dir: Path) -> list[Target]:
    """What the server (or fleet) of `state_dir` exports: each TorchServe's metrics API, and a fleet's gateway."""
    record = read_server_file(state_dir)
    if not record:
        raise MonitorError(f"{state_dir}: no server was started here (no {SERVER_FILE}); start one with dlops serve")
    if "fleet" not in record:
        return [Target(job=TORCHSERVE_JOB, url=record["urls"]["metrics"], ca=record.get("ca"))]
    from serving.fleet import Fleet

    fleet = Fleet.of(state_dir)
    members = [read_server_file(fleet.member_dir(name)) for name in fleet.members]
    return [Target(job=GATEWAY_JOB, url=record["urls"]["metrics"])] + [
        Target(job=TORCHSERVE_JOB, url=member["urls"]["metrics"], ca=member.get("ca")) for member in members
    ]


def scrape_config(found: list[Target], *, interval_s: float) -> dict:
    """Prometheus's configuration: one scrape job per kind of target, the recording rules beside it."""
    jobs: dict[tuple[str, str, str | None], list[str]] = {}
    for target in found:
        url = urllib.parse.urlsplit(target.url)
        jobs.setdefault((target.job, url.scheme, target.ca), []).append(url.netloc)
    configs = []
    for (job, scheme, ca), hosts in jobs.items():
        config = {"job_name": job, "scheme": scheme, "metrics_path": "/metrics", "static_configs": [{"targets": hosts}]}
        if ca:
            config["tls_config"] = {"ca_file": ca}
        configs.append(config)
    interval = f"{interval_s:g}s"
    return {"global": {"scrape_interval": interval, "evaluation_interval": interval},
            "rule_files": ["rules.yml"], "scrape_configs": configs}  # fmt: skip


def start(state_dir: Path, *, port: int = 9090, interval_s: float = 15.0, timeout_s: float = 60.0) -> str:
    """Start Prometheus for the server of `state_dir` on 127.0.0.1:`port`; return its URL."""
    import yaml

    folder = private_dir(Path(state_dir).resolve() / FOLDER)
    running = read_record(state_dir)
    if running and process_alive(running["pid"]):
        raise MonitorError(f"Prometheus already runs for {state_dir}: {running['url']} (dlops monitor prometheus stop)")
    config = scrape_config(targets(state_dir), interval_s=interval_s)
    (folder / "prometheus.yml").write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    shutil.copyfile(RULES, folder / "rules.yml")
    url = f"http://127.0.0.1:{port}"
    command = [prometheus(), f"--config.file={folder / 'prometheus.yml'}", f"--storage.tsdb.path={folder / 'data'}",
               f"--storage.tsdb.retention.time={RETENTION}", f"--web.listen-address=127.0.0.1:{port}"]  # fmt: skip
    with open(folder / "prometheus.log", "ab") as log:
        process = subprocess.Popen(command, cwd=folder, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                   env=child_environment("prometheus"))  # fmt: skip
    (folder / RECORD).write_text(json.dumps({"url": url, "pid": process.pid}), encoding="utf-8")
    deadline = time.monotonic() + timeout_s
    while not ready(url):
        if process.poll() is not None or time.monotonic() > deadline:
            said = (folder / "prometheus.log").read_text(errors="replace")[-2000:]
            stop(state_dir)
            raise MonitorError(f"Prometheus did not start on {url}: {said}")
        time.sleep(0.2)
    return url


def ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/-/ready", timeout=2) as answer:
            return answer.status == 200
    except OSError:
        return False


def read_record(state_dir: Path) -> dict:
    path = Path(state_dir) / FOLDER / RECORD
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def stop(state_dir: Path, timeout_s: float = 30.0) -> str:
    record = read_record(state_dir)
    if not record or not process_alive(record["pid"]):
        return f"no Prometheus runs for {state_dir}"
    os.kill(record["pid"], signal.SIGTERM)  # it finishes writing its head block, then exits
    deadline = time.monotonic() + timeout_s
    while process_alive(record["pid"]) and time.monotonic() < deadline:
        time.sleep(0.1)
    return f"stopped Prometheus {record['url']}"


def query(url: str, promql: str, *, at: float | None = None) -> list[dict]:
    """An instant query: [{"metric": labels, "value": [time, "number"]}, ...]."""
    params = {"query": promql} | ({"time": f"{at:.3f}"} if at else {})
    return _api(url, "query", params)


def query_range(url: str, promql: str, *, start: float, end: float, step_s: float) -> list[dict]:
    """A range query: [{"metric": labels, "values": [[time, "number"], ...]}, ...]."""
    return _api(url, "query_range", {"query": promql, "start": f"{start:.3f}", "end": f"{end:.3f}", "step": step_s})


def _api(url: str, endpoint: str, params: dict) -> list[dict]:
    request = f"{url}/api/v1/{endpoint}?{urllib.parse.urlencode(params)}"
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            body = json.load(answer)
    except OSError as e:
        raise MonitorError(f"Prometheus at {url} did not answer ({e}); start it: dlops monitor prometheus start") from e
    if body.get("status") != "success":
        raise MonitorError(f"Prometheus refused {params['query']!r}: {body.get('error')}")
    return body["data"]["result"]
