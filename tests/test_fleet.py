"""A fleet behind the gateway: the real HAProxy in front of two real TorchServe servers on loopback,
traffic from bounded loopback clients. Canaries promoted, aborted on errors and on latency, ended
inconclusive without traffic and by SIGTERM; a server killed under load; the registry alias followed;
every deploy an MLflow run."""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
import urllib.request
from collections import Counter
from pathlib import Path

import pytest

from monitoring import prometheus
from release import history
from release.canary import CanaryPolicy
from release.controller import follow_once
from serving import gateway
from serving.client import ServerClient
from serving.fleet import Fleet, stop_fleet
from serving.keys import REFUSED
from serving.server import ServeOptions, running_pid
from tests.conftest import cli_error, dlops_process, run_cli
from tests.faults import rewrite_archive
from tests.load import Load
from training.jobs.resnet.data.tinyimagenet import load_tinyimagenet
from training.tracking.tags import CANARY_ABORTED, DEPLOYMENT_RUN, OUTCOME, SERVING_ALIAS


def _haproxy_found() -> bool:
    try:
        return bool(gateway.haproxy())
    except gateway.GatewayError:
        return False


NEEDS = "a fleet needs Java and HAProxy (.ci/run installs them)"
pytestmark = pytest.mark.skipif(shutil.which("java") is None or not _haproxy_found(), reason=NEEDS)

MODEL = "test-fleet-resnet"
FAST = ["-b", "16", "-j", "0", "-p", "0", "--epochs", "1", "--experiment", "test-fleet", "--lr", "0.02"]
# Short steps for tests: two shares, judged after 2 s on at least 40 canary requests; a p99 up to 3x the
# stable one's passes (a p99 of 40 requests is nearly their maximum, and the other tests share the CPU)
QUICK = {"steps": [20, 50], "interval_s": 2, "min_requests": 40, "max_wait_s": 30, "max_error_rate": 0.01,
         "max_p99_ratio": 3.0}  # fmt: skip


@pytest.fixture(scope="module")
def versions(tiny_dataset, module_tmp):
    """Three versions of one registered ResNet (seeds 1-3)."""
    out = module_tmp.mktemp("fleet-runs")
    for seed in ("1", "2", "3"):
        run_cli("train", "resnet", tiny_dataset, *FAST, "--seed", seed, "--out-dir", out, "--registered-model", MODEL)
    return MODEL


@pytest.fixture(scope="module")
def fleet(versions, module_tmp):
    options = ServeOptions.on_free_ports(model_store=module_tmp.mktemp("fleet-store"),
                                         state_dir=module_tmp.mktemp("fleet"))  # fmt: skip
    run_cli("serve", "--model", f"models:/{MODEL}/1", "--servers", "2", "--state-dir", options.state_dir,
            "--model-store", options.model_store, "--inference-port", options.inference_port,
            "--metrics-port", options.metrics_port)  # fmt: skip
    found = Fleet.of(options.state_dir)
    yield found
    stop_fleet(Fleet.of(options.state_dir))


@pytest.fixture(scope="module")
def image(tiny_dataset) -> Path:
    return load_tinyimagenet(tiny_dataset).val[0][0]


def policy_file(tmp_path: Path, **changes) -> Path:
    path = tmp_path / "policy.yaml"
    path.write_text(json.dumps({**QUICK, **changes}))
    return path


def loaded(fleet: Fleet, image: Path, concurrency: int = 8) -> Load:
    """Classification requests through the gateway (tests/load.py)."""
    body = image.read_bytes()
    return Load(lambda: fleet.client.predict("resnet", body, "application/octet-stream"), concurrency)


def stable_version(fleet: Fleet) -> str:
    return gateway.read_map(fleet.gateway_dir, "stable")["resnet"]


def registered_versions(fleet: Fleet) -> list[set[str]]:
    """Per server: the versions of `resnet` registered there."""
    return [{v["modelVersion"] for v in server.management("GET", "/models/resnet/all").data}
            for server in fleet.servers()]  # fmt: skip


def faulty_archive(fleet: Fleet, target: Path, version: str, fault: str) -> Path:
    """The serving archive as `version`, with `fault` (tests/faults.py)."""
    store = Path(json.loads((fleet.state_dir / "server.json").read_text())["model_store"])
    return rewrite_archive(store / f"resnet-{stable_version(fleet)}.mar", target, version, fault)


def deployment_runs(client, outcome: str):
    experiment = client.get_experiment_by_name(history.DEPLOYMENTS)
    query = f"tags.{OUTCOME} = '{outcome}'"
    return client.search_runs([experiment.experiment_id], query, order_by=["attributes.start_time DESC"])


# --- the gateway ------------------------------------------------------------------------------------------------


def test_the_gateway_balances_over_both_servers_checks_the_key_and_exports_metrics(fleet, image):
    client = fleet.client
    answers = [client.predict_file("resnet", image) for _ in range(8)]
    assert {a.status for a in answers} == {200}
    assert {a.headers["x-dlops-model-version"] for a in answers} == {"1"}
    assert len({a.headers["x-dlops-worker"] for a in answers}) == 2, "one server answered everything"

    status = run_cli("fleet", "status", "--state-dir", fleet.state_dir).output
    assert "resnet: stable 1" in status and "stable (version 1): 8 requests, 0 errors, p99" in status, status
    assert "ts-1" in status and "ts-2" in status  # HAProxy's view of each server

    stranger = ServerClient.remote(client.urls["inference"], "not-the-key")
    refused = stranger.predict_file("resnet", image)
    assert refused.status == 401 and REFUSED in json.dumps(refused.data)
    direct = urllib.request.urlopen(f"{client.urls['metrics']}/metrics", timeout=10).read().decode()  # noqa: S310
    assert 'haproxy_backend_http_responses_total{proxy="stable",code="2xx"}' in direct

    # what a Prometheus for the fleet scrapes: the gateway's exporter and each server's per-version counts
    targets = prometheus.targets(fleet.state_dir)
    assert sorted(t.job for t in targets) == [prometheus.GATEWAY_JOB, *[prometheus.TORCHSERVE_JOB] * 2]
    counted = [urllib.request.urlopen(f"{t.url}/metrics", timeout=10).read().decode()  # noqa: S310
               for t in targets if t.job == prometheus.TORCHSERVE_JOB]  # fmt: skip
    assert all('DlopsRequests{Status="200",Version="1",ModelName="resnet"' in text for text in counted)

    # the servers themselves are reachable only through their owner-only sockets
    for server in fleet.servers():
        sockets = Path(server.urls["inference"].removeprefix("unix:")).parent
        assert sockets.stat().st_mode & 0o077 == 0


def test_tls_ends_at_the_gateway(versions, tmp_path, image):
    options = ServeOptions.on_free_ports(model_store=tmp_path / "store", state_dir=tmp_path / "tls")
    run_cli("serve", "--model", f"models:/{MODEL}/1", "--servers", "1", "--tls", "auto", "--state-dir",
            options.state_dir, "--model-store", options.model_store, "--inference-port", options.inference_port,
            "--metrics-port", options.metrics_port)  # fmt: skip
    try:
        client = Fleet.of(options.state_dir).client
        assert client.urls["inference"].startswith("https://")
        answer = client.predict_file("resnet", image)  # the certificate checked against the fleet's CA
        assert answer.status == 200 and answer.headers["x-dlops-model-version"] == "1"
        with pytest.raises(OSError):  # plain HTTP on the TLS port: no answer
            urllib.request.urlopen(f"http://127.0.0.1:{options.inference_port}/ping", timeout=10)  # noqa: S310
    finally:
        stop_fleet(Fleet.of(options.state_dir))


# --- canaries ---------------------------------------------------------------------------------------------------


def test_a_policy_is_the_defaults_then_what_the_job_declares_then_the_file(tmp_path):
    assert CanaryPolicy.for_job("resnet").max_p99_ratio == CanaryPolicy().max_p99_ratio == 2.0
    assert CanaryPolicy.for_job("lm").max_p99_ratio == 3.0  # the LM job's own threshold
    chosen = CanaryPolicy.for_job("lm", policy_file(tmp_path, max_p99_ratio=1.5))
    assert chosen.max_p99_ratio == 1.5 and chosen.steps == (20, 50) and chosen.min_requests == 40
    (tmp_path / "bad.yaml").write_text("steps: [5, 10]\nmax_latency: 3\n")
    with pytest.raises(ValueError, match=r"bad.yaml: unknown canary policy key\(s\) max_latency"):
        CanaryPolicy.for_job("resnet", tmp_path / "bad.yaml")
    with pytest.raises(ValueError, match="rising shares"):
        CanaryPolicy(steps=(50, 10))


def test_a_good_canary_is_promoted_through_every_step_and_recorded(fleet, image, tmp_path, client):
    with loaded(fleet, image) as load:
        time.sleep(1)
        output = run_cli("deploy", f"models:/{MODEL}/2", "--state-dir", fleet.state_dir, "--canary",
                         "--policy", policy_file(tmp_path)).output  # fmt: skip
        time.sleep(1)
    assert "step 1/2: 20%" in output and "step 2/2: 50%" in output and "step 2 passed" in output, output
    statuses = Counter(s.status for s in load.samples)
    assert statuses == {200: len(load.samples)}, statuses
    assert {s.version for s in load.samples} == {"1", "2"}
    assert stable_version(fleet) == "2" and registered_versions(fleet) == [{"2"}, {"2"}]
    assert not gateway.read_map(fleet.gateway_dir, "canary")
    assert str(client.get_model_version_by_alias(MODEL, SERVING_ALIAS).version) == "2"

    run = deployment_runs(client, outcome="promoted")[0]
    assert run.info.status == "FINISHED" and run.data.params[history.TO_VERSION] == "2"
    assert run.data.params[history.FROM_VERSION] == "1"
    assert json.loads(run.data.params[history.CANARY_POLICY])["steps"] == [20, 50]
    weights = client.get_metric_history(run.info.run_id, history.WEIGHT)
    assert [(m.step, m.value) for m in sorted(weights, key=lambda m: m.step)] == [(1, 20.0), (2, 50.0)]
    requests = client.get_metric_history(run.info.run_id, history.CANARY_REQUESTS)
    assert len(requests) == 2 and all(m.value >= QUICK["min_requests"] for m in requests)
    assert client.get_model_version(MODEL, "2").tags[DEPLOYMENT_RUN] == run.info.run_id


def test_a_canary_failing_5_percent_is_aborted_at_its_first_step(fleet, image, tmp_path, client):
    before = stable_version(fleet)
    mar = faulty_archive(fleet, tmp_path / "resnet-errors.mar", "errors", "errors")
    with loaded(fleet, image) as load:
        time.sleep(1)
        output = cli_error("deploy", mar, "--state-dir", fleet.state_dir, "--canary", "--policy",
                           policy_file(tmp_path, min_requests=100))  # fmt: skip
        time.sleep(1)
    assert "aborted: step 1 (20%): error rate" in output and "step 2/2" not in output, output
    assert f"resnet version {before}" in output and "still answers every request" in output
    assert stable_version(fleet) == before and registered_versions(fleet) == [{before}, {before}]
    by_version = Counter(s.version for s in load.samples)
    failed = [s for s in load.samples if s.status != 200]
    assert failed and all(s.version == "errors" for s in failed), Counter((s.status, s.version) for s in failed)
    share = by_version["errors"] / len(load.samples)
    assert share <= 0.3, f"the bad version answered {share:.0%} of requests (its step's share is 20%)"
    assert deployment_runs(client, outcome="aborted")[0].info.status == "FAILED"


def test_a_canary_three_times_slower_is_aborted_on_p99(fleet, image, tmp_path):
    before = stable_version(fleet)
    mar = faulty_archive(fleet, tmp_path / "resnet-slow.mar", "slow", "slow")
    with loaded(fleet, image, concurrency=4):
        time.sleep(1)
        output = cli_error("deploy", mar, "--state-dir", fleet.state_dir, "--canary", "--policy",
                           policy_file(tmp_path, min_requests=20, max_p99_ratio=2.0))  # fmt: skip
    assert "aborted: step 1 (20%): p99" in output and "the stable version's" in output, output
    assert stable_version(fleet) == before and registered_versions(fleet) == [{before}, {before}]


def test_a_canary_without_traffic_ends_inconclusive_with_the_stable_version_serving(fleet, tmp_path, client):
    before = stable_version(fleet)
    output = cli_error("deploy", f"models:/{MODEL}/3", "--state-dir", fleet.state_dir, "--canary", "--policy",
                       policy_file(tmp_path, interval_s=1, max_wait_s=3))  # fmt: skip
    assert "inconclusive" in output and "not enough traffic to judge" in output, output
    assert stable_version(fleet) == before and registered_versions(fleet) == [{before}, {before}]
    assert str(client.get_model_version_by_alias(MODEL, SERVING_ALIAS).version) == before
    assert deployment_runs(client, outcome="inconclusive")


def test_sigterm_mid_canary_leaves_the_stable_version_serving(fleet, image, tmp_path, client):
    before = stable_version(fleet)
    process = dlops_process("deploy", f"models:/{MODEL}/3", "--state-dir", fleet.state_dir, "--canary",
                            "--policy", policy_file(tmp_path, interval_s=300, max_wait_s=300))  # fmt: skip
    said = []
    with loaded(fleet, image, concurrency=2) as load:
        deadline = time.monotonic() + 240
        for line in process.stdout:
            said.append(line)
            if "step 1/2" in line or time.monotonic() > deadline:
                break
        time.sleep(1)
        assert gateway.read_map(fleet.gateway_dir, "canary") == {"resnet": "3"}, "".join(said)
        process.send_signal(signal.SIGTERM)
        rest, _ = process.communicate(timeout=120)
        time.sleep(0.5)
    output = "".join(said) + rest
    assert process.returncode != 0 and "interrupted: stopped by SIGTERM" in output, output
    assert stable_version(fleet) == before and registered_versions(fleet) == [{before}, {before}]
    assert {s.status for s in load.samples} == {200}
    assert Counter(s.version for s in load.samples)[before] > 0
    assert deployment_runs(client, outcome="interrupted")[0].info.status == "KILLED"


def test_the_controller_rolls_out_where_champion_moves_and_does_not_retry_an_aborted_version(
    fleet, image, tmp_path, client
):
    policy = policy_file(tmp_path)
    client.set_registered_model_alias(MODEL, "champion", "3")
    with loaded(fleet, image):
        said = follow_once(fleet, "champion", policy)
    assert said == ["resnet: resnet version 3 (test-fleet-resnet/3) promoted"], said
    assert stable_version(fleet) == "3"
    assert follow_once(fleet, "champion", policy) == [], "a version already serving was rolled out again"

    client.set_model_version_tag(MODEL, "1", CANARY_ABORTED, "error rate 9%")
    client.set_registered_model_alias(MODEL, "champion", "1")
    assert follow_once(fleet, "champion", policy) == [] and stable_version(fleet) == "3"


def test_dlops_fleet_follow_rolls_out_where_the_alias_moves_until_stopped(fleet, image, tmp_path, client):
    process = dlops_process("fleet", "follow", "champion", "--state-dir", fleet.state_dir, "--policy",
                            policy_file(tmp_path), "--interval", "1")  # fmt: skip
    said = []
    try:
        with loaded(fleet, image):
            client.set_registered_model_alias(MODEL, "champion", "2")
            for line in process.stdout:  # until the rollout has ended (or the process)
                said.append(line)
                if "resnet: " in line:
                    break
    finally:
        process.send_signal(signal.SIGTERM)
        rest, _ = process.communicate(timeout=120)
    output = "".join(said) + rest
    assert "@champion moved to version 2" in output and "resnet version 2 (test-fleet-resnet/2) promoted" in output
    assert stable_version(fleet) == "2" and registered_versions(fleet) == [{"2"}, {"2"}], output


def test_the_report_shows_the_deployment_history(fleet, tmp_path):
    run_cli("report", "--experiment", history.DEPLOYMENTS, "--out", tmp_path / "report")
    page = (tmp_path / "report" / "report.md").read_text()
    table = page.split("## Deployments", 1)[1]
    rows = [line for line in table.splitlines() if line.startswith("| 20")]
    outcomes = [row.split(" | ")[5] for row in rows]
    assert outcomes[0] == "promoted" and "aborted" in outcomes, rows
    assert {"inconclusive", "interrupted"} <= set(outcomes), rows
    aborted = next(row for row in rows if " aborted " in row)
    assert "| errors |" in aborted and "20%: canary p99" in aborted and "error rate" in aborted, aborted
    assert '<h2 id="deployments">' in (tmp_path / "report" / "report.html").read_text()


# --- servers that die and join ---------------------------------------------------------------------------------


def test_a_server_killed_under_load_fails_no_request_beyond_those_in_flight_and_one_added_joins(fleet, image, versions):
    victim = fleet.member_dir(fleet.members[0])
    with loaded(fleet, image, concurrency=8) as load:
        time.sleep(2)
        os.kill(running_pid(victim), signal.SIGKILL)
        time.sleep(4)
    failed = [s for s in load.samples if s.status != 200]
    assert len(failed) <= 8, f"{len(failed)} failed requests; at most the 8 in flight may fail: {failed[:3]}"
    assert len(load.samples) > 50
    states = {f[3]: f[5] for f in (line.split() for line in gateway.runtime(fleet.gateway_dir,
              "show servers state stable").splitlines()) if len(f) > 5 and f[1] == "stable"}  # fmt: skip
    assert states == {fleet.members[0]: "0", fleet.members[1]: "2"}, states  # 0: down, 2: running

    # a deploy goes on with the servers that answer, and says which one it left out
    output = run_cli("deploy", f"models:/{MODEL}/3", "--state-dir", fleet.state_dir).output
    assert f"server {fleet.members[0]} of the fleet does not answer" in output and stable_version(fleet) == "3"

    output = run_cli("fleet", "add", "--state-dir", fleet.state_dir).output
    added = next(line.split()[1] for line in output.splitlines() if "serves beside" in line)
    fleet = Fleet.of(fleet.state_dir)
    workers = {fleet.client.predict_file("resnet", image).headers["x-dlops-worker"] for _ in range(12)}
    assert len(workers) == 2, "the added server takes no requests"
    joined = fleet.member(added).management("GET", "/models/resnet/all").data
    assert [v["modelVersion"] for v in joined] == ["3"], "the added server does not serve what the fleet serves"
    assert added == fleet.members[-1] == "ts-3"
