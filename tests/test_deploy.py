"""Serving follows the registry: MLflow models of every version, aliases in every model-URI option,
deploys under load that drop no request, broken versions that never answer, rollback, keys that
outlast their expiry, and servers addressed by their state dir. Real TorchServe on loopback."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path

import mlflow
import pandas as pd
import psutil
import pytest
import torch

from release.deploy import default_version, serve
from serving import served
from serving.client import ServerClient
from serving.keys import read_keys
from serving.server import ServeOptions, running_pid, stop
from tests.conftest import cli_error, latest_run, run_cli
from tests.faults import rewrite_archive
from tests.load import Load
from training.checkpoint import load_checkpoint
from training.jobs import job_for
from training.jobs.lm.synthetic import write_synthetic_corpus
from training.jobs.resnet.classifier import classifier_from_checkpoint
from training.jobs.resnet.data.images import ImageFiles, eval_transform
from training.jobs.resnet.data.tinyimagenet import load_tinyimagenet
from training.tracking import registry
from training.tracking.tags import SERVING_ALIAS

pytestmark = pytest.mark.skipif(shutil.which("java") is None, reason="TorchServe needs Java (.ci/run installs it)")

RESNET, LM = "test-deploy-resnet", "test-deploy-lm"
FAST = ["-b", "16", "-j", "0", "-p", "0", "--epochs", "1", "--experiment", "test-deploy"]
TINY_LM = ["--epochs", "1", "--emsize", "16", "--nhid", "16", "--nlayers", "1", "--bptt", "20", "--experiment",
           "test-deploy-lm"]  # fmt: skip


@pytest.fixture(scope="module")
def registered(tiny_dataset, module_tmp, client):
    """Two ResNet versions (different seeds) and two LM versions (trained, and barely trained)."""
    out = module_tmp.mktemp("deploy-runs")
    for seed in ("1", "2"):
        run_cli("train", "resnet", tiny_dataset, *FAST, "--lr", "0.02", "--seed", seed, "--out-dir", out,
                "--registered-model", RESNET)  # fmt: skip
    corpus = write_synthetic_corpus(module_tmp.mktemp("deploy-corpus"), 200, 30, 30)
    for lr in ("5", "0.000001"):
        run_cli("train", "lm", corpus, *TINY_LM, "--lr", lr, "--out-dir", out, "--registered-model", LM)
    return {"corpus": corpus, "out": out}


@pytest.fixture(scope="module")
def server(registered, module_tmp):
    options = ServeOptions.on_free_ports(model_store=module_tmp.mktemp("deploy-store"),
                                         state_dir=module_tmp.mktemp("deploy-ts"))  # fmt: skip
    client = serve(options, [f"models:/{RESNET}/1", f"models:/{LM}/1"])
    yield client
    stop(options.state_dir)


def served_version(server: ServerClient, model: str = "resnet") -> str | None:
    return default_version(server, model)


def checkpoint_of(uri: str, tmp_path: Path) -> dict:
    path, _ = registry.download_checkpoint(uri, tmp_path)
    return load_checkpoint(path)


# --- MLflow models ----------------------------------------------------------------------------------------


def test_every_registered_version_is_an_mlflow_model_linked_to_its_run(registered, client):
    for name in (RESNET, LM):
        for version in client.search_model_versions(f"name = '{name}'"):
            assert version.source.startswith("models:/m-"), version.source
            logged = client.get_logged_model(version.source.removeprefix("models:/"))
            assert str(logged.status) == "READY" and logged.source_run_id == version.run_id
            linked = {m.key for m in logged.metrics}
            assert {"val/loss", f"best/{job_for(name.split('-')[-1]).best.name.replace('/', '_')}"} <= linked, linked
            info = mlflow.models.get_model_info(version.source)
            assert info.signature is not None and info.saved_input_example_info is not None
            requirements = Path(mlflow.artifacts.download_artifacts(f"{logged.artifact_location}/requirements.txt"))
            requirements = requirements.read_text().split()
            assert f"torch=={torch.__version__.split('+')[0]}" in requirements
            assert f"mlflow=={mlflow.__version__}" in requirements
        # the run keeps its raw checkpoint too
        run = client.get_run(version.run_id)
        assert any(a.path == "checkpoints" for a in client.list_artifacts(run.info.run_id))


def test_pyfunc_models_answer_as_the_offline_code_does(registered, tiny_dataset, tmp_path):
    run_cli("promote", f"models:/{RESNET}/2", "--alias", "champion")
    model = mlflow.pyfunc.load_model(f"models:/{RESNET}@champion")
    state = checkpoint_of(f"models:/{RESNET}@champion", tmp_path)
    val = load_tinyimagenet(tiny_dataset).val
    answers = model.predict(pd.DataFrame({"image": [p.read_bytes() for p, _ in val], "topk": [3] * len(val)}))
    images = ImageFiles(val, eval_transform(64))
    with torch.no_grad():
        logits = classifier_from_checkpoint(state)(torch.stack([images[i][0] for i in range(len(images))]))
    top3 = torch.softmax(logits, dim=1).topk(3).indices.tolist()
    for answer, expected in zip(answers, top3, strict=True):
        assert [a["class"] for a in answer] == [state["classes"][c] for c in expected]

    lm = mlflow.pyfunc.load_model(f"models:/{LM}/1")
    (text,) = lm.predict(pd.DataFrame({"prompt": ["the old cat"], "max_words": [12], "temperature": [0.8],
                                       "seed": [42]}))  # fmt: skip
    outf = tmp_path / "generated.txt"
    run_cli("generate", "--checkpoint", f"models:/{LM}/1", "--prompt", "the old cat", "--words", "12", "--seed",
            "42", "--temperature", "0.8", "--outf", outf)  # fmt: skip
    assert text["text"] == outf.read_text(encoding="utf-8").rstrip("\n") and text["words"] == 12


def test_mlflow_models_serve_answers(registered, tmp_path):
    from serving.server import ServeOptions as Ports

    port = Ports.on_free_ports().inference_port
    venv = Path(sys.executable).parent  # `mlflow models serve` starts uvicorn from PATH, as in an activated venv
    command = [str(venv / "mlflow"), "models", "serve", "-m", f"models:/{LM}/1", "--env-manager", "local", "-h",
               "127.0.0.1", "-p", str(port)]  # fmt: skip
    env = {**os.environ, "PATH": f"{venv}:{os.environ['PATH']}"}
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                               start_new_session=True)  # fmt: skip
    try:
        body = json.dumps({"dataframe_split": {"columns": ["prompt", "max_words", "temperature", "seed"],
                                               "data": [["the old cat", 5, 1.0, 7]]}}).encode()  # fmt: skip
        deadline = time.monotonic() + 120
        while True:
            try:
                request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", body,
                                                 {"Content-Type": "application/json"})  # fmt: skip
                with urllib.request.urlopen(request, timeout=30) as response:
                    answer = json.loads(response.read())
                break
            except OSError:
                assert time.monotonic() < deadline and process.poll() is None, "mlflow models serve did not answer"
                time.sleep(1)
    finally:
        process.terminate()
        process.wait(timeout=30)
    state = checkpoint_of(f"models:/{LM}/1", tmp_path)
    expected = job_for("lm").serving.answer(state, {"prompt": "the old cat", "max_words": 5, "temperature": 1.0,
                                                 "seed": 7})  # fmt: skip
    assert answer["predictions"] == [expected]


# --- aliases ------------------------------------------------------------------------------------------------


def test_aliases_and_latest_resolve_in_every_model_uri_option(registered, tiny_dataset, tmp_path, client):
    run_cli("promote", f"models:/{RESNET}/1", "--alias", "candidate")
    champion, latest = f"models:/{RESNET}@candidate", f"models:/{RESNET}/latest"
    out = run_cli("package", "resnet", "--model-uri", champion, "--model-store", tmp_path / "store").output
    assert (tmp_path / "store" / "resnet-1.mar").is_file(), out
    run_cli("package", "resnet", "--checkpoint", latest, "--model-store", tmp_path / "store")
    assert (tmp_path / "store" / "resnet-2.mar").is_file()
    output = run_cli("evaluate", "--checkpoint", champion, tiny_dataset, "-b", "16", "-j", "0").output
    assert " * Acc@1" in output
    assert latest_run(client, "test-deploy", job="evaluate").data.params["checkpoint"] == champion
    run_cli("compare", champion, latest, tiny_dataset, "-j", "0", "--out-dir", tmp_path / "compare")
    run_cli("train", "resnet", tiny_dataset, *FAST, "--init-from", champion, "--out-dir", tmp_path / "init",
            "--registered-model", "test-deploy-init")  # fmt: skip
    source_run = client.get_model_version(RESNET, "1").run_id
    assert latest_run(client, "test-deploy", job="train-resnet").data.params["init_from_run_id"] == source_run
    run_cli("generate", "--checkpoint", f"models:/{LM}/latest", "--words", "3", "--outf", tmp_path / "g.txt")
    assert "models:/NAME@ALIAS" in cli_error("package", "resnet", "--model-uri", f"models:/{RESNET}/newest")
    assert "not in the registry" in cli_error("evaluate", "--checkpoint", f"models:/{RESNET}@nobody", tiny_dataset)


def test_versions_registered_by_earlier_releases_still_resolve(registered, tiny_dataset, tmp_path, client):
    """Earlier releases registered the run's checkpoints/best.pt itself, not an MLflow model."""
    run_id = client.get_model_version(RESNET, "1").run_id
    client.create_registered_model("test-deploy-legacy")
    source = f"{client.get_run(run_id).info.artifact_uri}/checkpoints/best.pt"
    version = client.create_model_version("test-deploy-legacy", source=source, run_id=run_id).version
    run_cli("package", "resnet", "--model-uri", f"models:/test-deploy-legacy/{version}", "--model-store", tmp_path)
    assert (tmp_path / f"resnet-{version}.mar").is_file()
    output = run_cli("evaluate", "--checkpoint", "models:/test-deploy-legacy/latest", tiny_dataset, "-b", "16",
                     "-j", "0").output  # fmt: skip
    assert " * Acc@1" in output


def test_promote_if_better_compares_the_validation_metric(registered, client):
    good, bad = f"models:/{LM}/1", f"models:/{LM}/2"  # lr 5 and lr 1e-6: val loss low and high
    run_cli("promote", good, "--alias", "best")
    kept = run_cli("promote", bad, "--alias", "best", "--if-better").output
    assert "@best stays on" in kept and "val/loss" in kept and "lower is better" in kept
    assert str(client.get_model_version_by_alias(LM, "best").version) == "1"
    run_cli("promote", bad, "--alias", "best")
    moved = run_cli("promote", good, "--alias", "best", "--if-better").output
    assert "@best moved to" in moved and str(client.get_model_version_by_alias(LM, "best").version) == "1"


# --- deploys ------------------------------------------------------------------------------------------------


def loaded(server: ServerClient, image: Path, concurrency: int = 8) -> Load:
    """Classification requests to `server` (tests/load.py)."""
    return Load(lambda: server.predict_file("resnet", image), concurrency)


def test_three_deploys_under_load_drop_no_request_and_rollback_restores(server, tiny_dataset, client):
    image = load_tinyimagenet(tiny_dataset).val[0][0]
    deploys = [f"models:/{RESNET}/2", f"models:/{RESNET}/1", f"models:/{RESNET}/latest"]
    with loaded(server, image) as load:
        time.sleep(1)
        for uri in deploys:
            run_cli("deploy", uri, "--state-dir", server.state_dir)
            assert served_version(server) == str(registry.resolve(uri).version)
        time.sleep(1)
    statuses = Counter(s.status for s in load.samples)
    versions = Counter(s.version for s in load.samples)
    assert statuses == {200: len(load.samples)}, statuses
    assert set(versions) == {"1", "2"} and len(load.samples) > 50, versions
    history = [(d.version, d.event) for d in served.history(server.state_dir)["resnet"]]
    assert history == [("1", "serve"), ("2", "deploy"), ("1", "deploy"), ("2", "deploy")]
    assert str(client.get_model_version_by_alias(RESNET, SERVING_ALIAS).version) == "2"
    events = [event for _, event in registry.deploy_history(RESNET, "1")]
    assert any(e.startswith("deploy: serving as resnet version 1") for e in events)
    assert any(e.startswith("retired:") for e in events)

    output = run_cli("rollback", "resnet", "--state-dir", server.state_dir).output
    assert "serving resnet version 1" in output and served_version(server) == "1"
    assert str(client.get_model_version_by_alias(RESNET, SERVING_ALIAS).version) == "1"
    assert server.predict_file("resnet", image).headers["x-dlops-model-version"] == "1"
    versions_now = server.management("GET", "/models/resnet/all").data
    assert [v["modelVersion"] for v in versions_now] == ["1"], "the old version was not retired"


def worker_priorities(state_dir: Path) -> dict[int, int]:
    """The server's worker processes and the highest nice value among each one's threads."""
    found = {}
    for child in psutil.Process(running_pid(state_dir)).children(recursive=True):
        try:
            if any("model_service_worker" in part for part in child.cmdline()):
                found[child.pid] = max(os.getpriority(os.PRIO_PROCESS, t.id) for t in child.threads())
        except (psutil.Error, OSError):
            continue
    return found


class PriorityWatch(threading.Thread):
    """The highest nice value seen on each worker that was not there when the watch began."""

    def __init__(self, state_dir: Path):
        super().__init__()
        self.state_dir, self.before = state_dir, set(worker_priorities(state_dir))
        self.seen: dict[int, int] = {}
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.is_set():
            for pid, nice in worker_priorities(self.state_dir).items():
                if pid not in self.before:
                    self.seen[pid] = max(self.seen.get(pid, 0), nice)
            time.sleep(0.01)


def test_new_workers_start_at_the_lowest_priority_and_answer_at_their_own(server):
    """With --yield-cpu, while a deploy starts the new version, its workers yield the CPU to the serving
    ones (nice 19, every thread); from its first real request they run at the priority the others
    have. By default they start at the server's priority."""
    for version, given, expected_while_starting in (("2", ["--yield-cpu"], 19), ("1", [], 0)):
        watch = PriorityWatch(server.state_dir)
        watch.start()
        try:
            output = run_cli("deploy", f"models:/{RESNET}/{version}", "--state-dir", server.state_dir, *given).output
        finally:
            watch.stopping.set()
            watch.join()
        assert served_version(server) == version
        if os.geteuid() != 0:  # without root the priority could not be given back: nothing is lowered, and said
            assert set(watch.seen.values()) <= {0} and (not given or "CAP_SYS_NICE" in output)
            continue
        assert watch.seen and max(watch.seen.values()) == expected_while_starting, (watch.seen, output)
        now = worker_priorities(server.state_dir)
        assert all(now[pid] == 0 for pid in watch.seen if pid in now), "the new version answers at normal priority"


@pytest.mark.parametrize(("fault", "reason"), [("load", "failed to load: RuntimeError: broken"),
                                               ("answer", "answers the check request differently")])  # fmt: skip
def test_a_broken_version_never_answers_and_the_old_one_keeps_serving(server, tiny_dataset, tmp_path, fault, reason):
    store = Path(json.loads((server.state_dir / "server.json").read_text())["model_store"])
    before = served_version(server)
    mar = rewrite_archive(store / f"resnet-{before}.mar", tmp_path / f"resnet-{fault}.mar", f"broken-{fault}", fault)
    image = load_tinyimagenet(tiny_dataset).val[0][0]
    with loaded(server, image, concurrency=2) as load:
        output = cli_error("deploy", mar, "--state-dir", server.state_dir, "--timeout", "60")
    assert reason in output and f"resnet version {before}" in output and "still serves" in output, output
    assert served_version(server) == before
    assert not server.management("GET", f"/models/resnet/broken-{fault}").ok, "the broken version stayed registered"
    assert {s.status for s in load.samples} == {200} and {s.version for s in load.samples} == {before}


# --- keys and servers addressed by their state dir -----------------------------------------------------------


def test_a_second_server_runs_beside_keeps_valid_keys_past_their_expiry_and_stops_alone(server, tmp_path):
    options = ServeOptions.on_free_ports(model_store=tmp_path / "store", state_dir=tmp_path / "ts",
                                         token_expiration_min=0.1)  # keys last 6 s  # fmt: skip
    second = serve(options, [f"models:/{LM}/1"])
    try:
        first_key = read_keys(options.state_dir)["inference"].value
        time.sleep(10)  # past the expiry of the keys it started with
        key = read_keys(options.state_dir)["inference"]
        assert key.value != first_key and key.expires_in() > 0, "the keeper did not renew the key"
        request = urllib.request.Request(f"{second.urls['inference']}/predictions/lm", b'{"max_words": 3}',
                                         {"Authorization": f"Bearer {key.value}",
                                          "Content-Type": "application/json"})  # fmt: skip
        with urllib.request.urlopen(request, timeout=60) as response:
            assert response.status == 200  # a plain client with the key file's key
        assert second.predict_fields("lm", {"max_words": 3}).ok and server.predict_fields("lm", {"max_words": 3}).ok
        assert "renewed the inference key" in (options.state_dir / "logs" / "keys.log").read_text()
        assert "is running" in cli_error("serve", "--state-dir", options.state_dir, "--model-store", tmp_path)
    finally:
        said = stop(options.state_dir)
    assert "TorchServe has stopped" in said and running_pid(options.state_dir) is None
    assert running_pid(server.state_dir) and server.predict_fields("lm", {"max_words": 2}).ok, (
        "stopped the other server"
    )
    assert "no TorchServe is running" in run_cli("stop", "--state-dir", options.state_dir).output


def test_a_server_started_empty_takes_its_first_models_by_deploy(registered, tmp_path, monkeypatch):
    """The serving container's start: no model yet; `dlops deploy` adds them; its health check passes."""
    from serving import container
    from serving.server import start

    options = ServeOptions.on_free_ports(model_store=tmp_path / "store", state_dir=tmp_path / "ts")
    options.model_store.mkdir()
    assert container.last_served(options.state_dir, options.model_store) == []
    client = start(options, [], allow_empty=True)
    try:
        run_cli("deploy", f"models:/{LM}/1", "--state-dir", options.state_dir, "--model-store", options.model_store)
        assert served_version(client, "lm") == "1" and client.predict_fields("lm", {"max_words": 3}).ok
        monkeypatch.setattr(container, "STATE_DIR", options.state_dir)
        assert container.healthy() == 0
        assert container.last_served(options.state_dir, options.model_store) == [options.model_store / "lm-1.mar"]
    finally:
        stop(options.state_dir)
    assert container.healthy() == 1
