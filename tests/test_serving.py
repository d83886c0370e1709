"""TorchServe end to end: package both models, serve them on loopback, query them, refuse bad input."""

from __future__ import annotations

import base64
import json
import os
import re
import struct
import subprocess
import sys
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from release.deploy import serve
from release.package import ModelSettings
from serving.client import ServerClient
from serving.server import ServeOptions, effective_config, stop
from tests.conftest import REPO, artifact_paths, cli_error, latest_run, run_cli
from training.checkpoint import load_checkpoint
from training.cli import main
from training.jobs.lm.synthetic import write_synthetic_corpus
from training.jobs.resnet.classifier import classifier_from_checkpoint
from training.jobs.resnet.data.images import ImageFiles, eval_transform
from training.jobs.resnet.data.tinyimagenet import load_tinyimagenet

pytestmark = pytest.mark.skipif(
    subprocess.run(["which", "java"], capture_output=True).returncode != 0,
    reason="TorchServe needs Java (.ci/run installs it)",
)


@pytest.fixture(scope="module")
def checkpoints(tiny_dataset, module_tmp, client):
    out = module_tmp.mktemp("serve-runs")
    run_cli("train", "resnet", tiny_dataset, "--epochs", "1", "-b", "16", "-j", "0", "--lr", "0.02", "--out-dir", out,
            "--experiment", "test-serve", "--registered-model", "test-serve-resnet")  # fmt: skip
    resnet_run = latest_run(client, "test-serve", job="train-resnet")
    corpus = write_synthetic_corpus(module_tmp.mktemp("serve-corpus"), 200, 30, 30)
    run_cli("train", "lm", corpus, "--epochs", "1", "--emsize", "16", "--nhid", "16", "--nlayers", "1",
            "--bptt", "20", "--lr", "5", "--out-dir", out, "--experiment", "test-serve",
            "--registered-model", "test-serve-lm")  # fmt: skip
    lm_run = latest_run(client, "test-serve", job="train-lm")
    return {"resnet": out / resnet_run.info.run_id / "best.pt", "lm": out / lm_run.info.run_id / "best.pt",
            "resnet_run": resnet_run.info.run_id, "lm_run": lm_run.info.run_id}  # fmt: skip


@pytest.fixture(scope="module")
def model_store(checkpoints, module_tmp, client):
    store = module_tmp.mktemp("model_store")
    # one from the registry, one from a run id: both resolve to the best checkpoint
    version = client.search_model_versions(f"run_id = '{checkpoints['resnet_run']}'")[0].version
    run_cli("package", "resnet", "--model-uri", f"models:/test-serve-resnet/{version}", "--model-store", store,
            "--batch-size", "4", "--max-batch-delay", "50")  # fmt: skip
    run_cli("package", "lm", "--run-id", checkpoints["lm_run"], "--model-store", store, "--batch-size", "4",
            "--max-batch-delay", "50")  # fmt: skip
    return store


def mar_of(store: Path, model: str) -> Path:
    (mar,) = store.glob(f"{model}-*.mar")
    return mar


@pytest.fixture(scope="module")
def server(model_store, module_tmp):
    # fp32, so that HTTP answers equal the fp32 evaluation below bit for bit
    options = ServeOptions.on_free_ports(model_store=model_store, state_dir=module_tmp.mktemp("ts"), amp="off")
    client = serve(options, [])
    yield client
    stop(options.state_dir)


def test_mar_is_versioned_logged_to_its_run_and_carries_its_serving_settings(model_store, checkpoints, client):
    version = client.search_model_versions(f"run_id = '{checkpoints['resnet_run']}'")[0]
    resnet = mar_of(model_store, "resnet")
    assert resnet.name == f"resnet-{version.version}.mar"  # the registry's version
    assert f"serving/{resnet.name}" in artifact_paths(client, checkpoints["resnet_run"])
    lm = mar_of(model_store, "lm")  # from a run id: epoch and weights hash
    assert re.fullmatch(r"lm-e1-[0-9a-f]{8}\.mar", lm.name) and f"serving/{lm.name}" in artifact_paths(
        client, checkpoints["lm_run"]
    )
    assert version.tags["mar"] == f"runs:/{checkpoints['resnet_run']}/serving/{resnet.name}"
    with zipfile.ZipFile(resnet) as zf:
        names = set(zf.namelist())
        meta = json.loads(zf.read("meta.json"))
        config = zf.read("model-config.yaml").decode()
        compression = {item.filename: item.compress_type for item in zf.infolist()}
    # stored, not deflated: TorchServe extracts an archive in the thread that answers inference requests
    assert set(compression.values()) == {zipfile.ZIP_STORED}, compression
    assert {"image_classifier.py", "handler_common.py", "dlops_classifier.py", "meta.json", "weights.pt"} <= names
    assert meta["run_id"] == checkpoints["resnet_run"] and len(meta["labels"]) == 4
    assert meta["registered"] == f"test-serve-resnet/{version.version}"
    assert config == ModelSettings(batch_size=4, max_batch_delay_ms=50).yaml() and "batchSize: 4" in config


def test_the_server_batches_as_each_archive_says(server):
    answer = server.management("GET", "/models/resnet")
    assert answer.ok, answer
    (described,) = answer.data
    assert (described["batchSize"], described["maxBatchDelay"], described["minWorkers"]) == (4, 50, 1)


def test_http_top1_equals_local_evaluation_for_every_val_image(server, checkpoints, tiny_dataset):
    state = load_checkpoint(checkpoints["resnet"])
    model = classifier_from_checkpoint(state)
    val = load_tinyimagenet(tiny_dataset).val
    images = ImageFiles(val, eval_transform(64))
    with torch.no_grad():
        local = model(torch.stack([images[i][0] for i in range(len(images))])).argmax(1).tolist()
    with ThreadPoolExecutor(8) as pool:  # concurrent requests exercise server-side batching
        answers = list(pool.map(lambda s: server.predict_file("resnet", s[0]), val))
    for (path, _), answer, expected in zip(val, answers, local, strict=True):
        assert answer.ok, answer
        top = answer.data
        assert len(top) == 4 and top[0]["class"] == state["classes"][expected], path.name
        assert top[0]["label"] == state["labels"][expected]
        assert sum(a["probability"] for a in top) == pytest.approx(1.0, abs=1e-4)


def test_topk_from_header_multipart_and_json(server, tiny_dataset):
    image = load_tinyimagenet(tiny_dataset).val[0][0]
    answer = server.predict_file("resnet", image, {"X-TopK": "2"})
    assert answer.ok and len(answer.data) == 2
    body = json.dumps({"image": base64.b64encode(image.read_bytes()).decode(), "topk": 3}).encode()
    answer = server.predict("resnet", body, "application/json")
    assert answer.ok and len(answer.data) == 3
    boundary = "dlopsboundary"
    form = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="data"; filename="x.jpg"\r\n'
            f"Content-Type: image/jpeg\r\n\r\n"
        ).encode()
        + image.read_bytes()
        + (f'\r\n--{boundary}\r\nContent-Disposition: form-data; name="topk"\r\n\r\n1\r\n--{boundary}--\r\n').encode()
    )
    answer = server.predict("resnet", form, f"multipart/form-data; boundary={boundary}")
    assert answer.ok and len(answer.data) == 1
    assert answer.headers["x-dlops-model-version"] == mar_of(server_store(server), "resnet").stem.split("-", 1)[1]


def server_store(server: ServerClient) -> Path:
    from release.deploy import client_store

    return Path(client_store(server))


def test_http_generation_equals_cli_generation(server, checkpoints, tmp_path):
    outf = tmp_path / "cli.txt"
    run_cli("generate", "--checkpoint", checkpoints["lm"], "--prompt", "the old cat", "--words", "30",
            "--seed", "42", "--temperature", "0.8", "--outf", outf)  # fmt: skip
    answer = server.predict_fields("lm", {"prompt": "the old cat", "max_words": 30, "seed": 42, "temperature": 0.8})
    assert answer.ok, answer
    assert answer.data["text"] == outf.read_text(encoding="utf-8").rstrip("\n")
    assert answer.data["words"] == 30 and answer.data["unknown_words"] == []
    answer = server.predict_fields("lm", {"prompt": "the Atlantis cat", "max_words": 3, "seed": 1})
    assert answer.ok and answer.data["unknown_words"] == ["Atlantis"]


def bomb_png(width: int = 20000, height: int = 20000) -> bytes:
    """A valid PNG header announcing width x height pixels, with a tiny (truncated) payload."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )


def worker_pids(server: ServerClient, model: str) -> list[int]:
    from serving.server import workers

    return [w["pid"] for w in workers(server, model)]


@pytest.mark.parametrize(
    ("model", "body", "content_type", "status", "message"),
    [
        ("resnet", b"", "application/octet-stream", 400, "empty request"),
        ("resnet", b"this is not an image", "application/octet-stream", 400, "not an image"),
        ("resnet", "TRUNCATED", "image/jpeg", 400, "truncated or corrupt"),
        ("resnet", "BOMB", "image/png", 413, "image too large"),
        ("resnet", b'{"image": "%%%"}', "application/json", 400, "not valid base64"),
        ("resnet", b'{"topk": 2}', "application/json", 400, "needs an 'image' field"),
        ("lm", b'{"prompt": "the cat",', "application/json", 400, "malformed JSON"),
        ("lm", b"", "application/json", 400, "empty request"),
        ("lm", b'["a list"]', "application/json", 400, "expected a JSON object"),
        ("lm", b'{"prompt": 7}', "application/json", 400, "'prompt' must be a string"),
        ("lm", b'{"max_words": "many"}', "application/json", 400, "'max_words' must be an integer"),
        ("lm", b'{"max_words": 100000}', "application/json", 400, "'max_words' must be between 1 and 500"),
        ("lm", b'{"temperature": 0}', "application/json", 400, "'temperature' must be >= 0.01"),
        ("lm", b'{"temperature": true}', "application/json", 400, "'temperature' must be a number"),
        ("lm", b'{"words": 3}', "application/json", 400, "unknown field"),
        ("lm", b'{"temperature": NaN}', "application/json", 400, "'temperature' is not a finite number"),
        ("lm", b'{"seed": Infinity}', "application/json", 400, "'seed' is not a finite number"),
        ("lm", b'{"max_words": -Infinity, "prompt": "a"}', "application/json", 400, "'max_words' is not a finite"),
        ("resnet", b'{"image": "AAAA", "topk": NaN}', "application/json", 400, "'topk' is not a finite number"),
    ],
)
def test_bad_input_gets_a_4xx_json_answer_and_the_worker_survives(
    server, tiny_dataset, model, body, content_type, status, message
):
    image = load_tinyimagenet(tiny_dataset).val[0][0].read_bytes()
    body = {"TRUNCATED": image[: len(image) // 2], "BOMB": bomb_png()}.get(body, body)
    before = worker_pids(server, model)
    answer = server.predict(model, body, content_type)
    assert answer.status == status and message in answer.data["error"], answer
    assert worker_pids(server, model) == before, "the worker restarted"
    if model == "resnet":
        assert server.predict_file("resnet", load_tinyimagenet(tiny_dataset).val[1][0]).ok
    else:
        assert server.predict_fields("lm", {"max_words": 2}).ok


def test_requests_without_the_key_are_refused_saying_where_it_is(server, tiny_dataset, tmp_path):
    from serving.keys import read_keys

    assert read_keys(server.state_dir).get("inference"), "token authorization should be on by default"
    image = load_tinyimagenet(tiny_dataset).val[0][0]
    keyless = ServerClient(state_dir=tmp_path, urls=server.urls)  # no key file there: no key sent
    answer = keyless.predict_file("resnet", image)
    assert answer.status == 400 and "Token Authorization failed" in json.dumps(answer.data)
    (tmp_path / "key_file.json").write_text(json.dumps({"inference": {"key": "wrong-key", "expiration time":
                                                                      "2099-01-01T00:00:00Z"}}))  # fmt: skip
    answer = keyless.predict_file("resnet", image)
    assert (
        answer.status == 400
        and f"The current keys of this server are in {tmp_path / 'key_file.json'}" in (answer.data["error"])
    )


def test_a_teammate_with_the_url_and_a_handed_over_key_is_answered(server, tiny_dataset, monkeypatch, tmp_path):
    """Another machine has no state dir: `dlops keys show` hands the key over, --url and --key (or
    DLOPS_INFERENCE_KEY) use it; `dlops keys rotate` makes the old one useless at once."""
    monkeypatch.chdir(tmp_path)  # no state dir around: only the URL and the key reach the server
    image = load_tinyimagenet(tiny_dataset).val[0][0]
    key = CliRunner().invoke(main, ["keys", "show", "--state-dir", str(server.state_dir)]).stdout.strip()
    url = server.urls["inference"]
    answer = json.loads(run_cli("predict", image, "--url", url, "--key", key, "--field", "topk=2").stdout)
    assert len(answer) == 2 and {"class", "label", "probability"} <= set(answer[0])
    refused = cli_error("predict", image, "--url", url)
    assert "refused the inference key" in refused and "dlops keys show" in refused
    monkeypatch.setenv("DLOPS_INFERENCE_KEY", key)
    assert json.loads(run_cli("predict", image, "--url", url).stdout)
    rotated = CliRunner().invoke(main, ["keys", "rotate", "--state-dir", str(server.state_dir)]).stdout.strip()
    assert rotated and rotated != key
    assert "refused the inference key" in cli_error("predict", image, "--url", url)
    assert json.loads(run_cli("predict", image, "--url", url, "--key", rotated).stdout)
    assert server.predict_file("resnet", image).ok, "clients with the state dir read the new key"


def test_only_the_inference_and_metrics_apis_can_be_published(tmp_path):
    published = effective_config(ServeOptions(inference_address="0.0.0.0", metrics_address="10.0.0.5"), [])
    assert published["inference_address"] == "http://0.0.0.0:8080"
    assert published["metrics_address"] == "http://10.0.0.5:8082"
    assert published["management_address"] == "http://127.0.0.1:8081", "management never leaves loopback"
    assert published["grpc_inference_address"] == published["grpc_management_address"] == "127.0.0.1"
    assert effective_config(ServeOptions(), [])["inference_address"] == "http://127.0.0.1:8080"
    keyless = cli_error("serve", "--inference-address", "0.0.0.0", "--no-auth", "--model-store", tmp_path,
                        "--state-dir", tmp_path / "ts")  # fmt: skip
    assert "without a key" in keyless


def test_handler_runs_from_the_unpacked_archive_without_the_project(model_store, tiny_dataset, tmp_path):
    """The .mar needs torch, torchvision and Pillow only: importing training/serving is blocked."""
    for mar in ("resnet.mar", "lm.mar"):
        with zipfile.ZipFile(mar_of(model_store, mar.split(".")[0])) as zf:
            zf.extractall(tmp_path / mar)
    image = load_tinyimagenet(tiny_dataset).val[0][0]
    script = f"""
import json, sys
sys.modules["training"] = None; sys.modules["serving"] = None  # any import of the project fails
class Context:
    def __init__(self, model_dir):
        self.system_properties = {{"model_dir": model_dir}}
        self.manifest = json.load(open(model_dir + "/MAR-INF/MANIFEST.json"))
        self.statuses = {{}}
    def get_all_request_header(self, idx): return {{}}
    def set_response_status(self, code, phrase, idx): self.statuses[idx] = code
    def set_response_header(self, idx, key, value): pass
    def get_request_id(self, idx): return None  # TorchServe's Context: the frontend's id
sys.path.insert(0, {str(tmp_path / "resnet.mar")!r})
from image_classifier import ImageClassifier
handler = ImageClassifier(); ctx = Context({str(tmp_path / "resnet.mar")!r}); handler.initialize(ctx)
out = handler.handle([{{"body": open({str(image)!r}, "rb").read()}}, {{"body": b"junk"}}], ctx)
assert len(out[0]) == 4 and out[1]["status"] == 400 and ctx.statuses == {{1: 400}}, out
sys.path.insert(0, {str(tmp_path / "lm.mar")!r})
from text_generator import TextGenerator
handler = TextGenerator(); ctx = Context({str(tmp_path / "lm.mar")!r}); handler.initialize(ctx)
out = handler.handle([{{"body": {{"prompt": "the", "max_words": 5, "seed": 3}}}}], ctx)
assert out[0]["words"] == 5, out
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_serve_without_java_says_how_to_install_it(model_store, tmp_path):
    env = {**os.environ, "PATH": str(Path(sys.executable).parent)}
    result = subprocess.run(
        [sys.executable, "-m", "training.cli", "serve", "--model-store", model_store, "--state-dir", tmp_path],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=120,
    )  # fmt: skip
    assert result.returncode == 1 and "apt-get install -y openjdk-17-jre-headless" in result.stderr


def test_package_refuses_the_wrong_kind(checkpoints, tmp_path):
    assert "package it as `lm`" in cli_error("package", "resnet", "--checkpoint", checkpoints["lm"],
                                             "--model-store", tmp_path)  # fmt: skip


def metric_values(server: ServerClient, name: str) -> dict[str, float]:
    """The metrics endpoint's samples of one metric: labels text -> value."""
    import urllib.request

    with urllib.request.urlopen(f"{server.urls['metrics']}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {m.group(1): float(m.group(2)) for m in re.finditer(rf"^{name}\{{(.*?)\}} ([\d.eE+-]+)$", text, re.M)}


def labelled(samples: dict[str, float], **labels: str) -> float:
    return sum(v for k, v in samples.items() if all(f'{name}="{value}"' in k for name, value in labels.items()))


MIXED = [
    {"prompt": "the old cat", "max_words": 30, "temperature": 0.8, "seed": 42},
    {"prompt": "", "max_words": 5, "temperature": 1.0, "seed": 7},
    {"prompt": "a Atlantis word", "max_words": 17, "temperature": 2.0, "seed": 1},
    {"prompt": "the", "max_words": 1, "temperature": 0.5, "seed": 99},
    {"prompt": "old old old old old old old old", "max_words": 23, "temperature": 1.3, "seed": 5},
    {"prompt": "cat", "max_words": 12, "temperature": 0.1, "seed": 3},
]


def test_a_request_gets_the_same_text_alone_in_a_batch_and_from_the_cli(server, checkpoints, tmp_path):
    alone = [server.predict_fields("lm", r) for r in MIXED]
    before = metric_values(server, "DlopsBatches"), metric_values(server, "DlopsRequests")
    with ThreadPoolExecutor(len(MIXED)) as pool:
        together = list(pool.map(lambda r: server.predict_fields("lm", r), MIXED))
    after = metric_values(server, "DlopsBatches"), metric_values(server, "DlopsRequests")
    batches = labelled(after[0], ModelName="lm") - labelled(before[0], ModelName="lm")
    requests = labelled(after[1], ModelName="lm", Status="200") - labelled(before[1], ModelName="lm", Status="200")
    assert requests == len(MIXED) and batches < requests, "the concurrent requests were not batched"
    for request, a, b in zip(MIXED, alone, together, strict=True):
        assert a.ok and b.ok, (a, b)
        assert a.data == b.data, request
        assert a.data["words"] == request["max_words"]
    for request, answer in zip(MIXED[:3], alone[:3], strict=True):
        outf = tmp_path / f"seed{request['seed']}.txt"
        run_cli("generate", "--checkpoint", checkpoints["lm"], "--prompt", request["prompt"], "--words",
                request["max_words"], "--seed", request["seed"], "--temperature", request["temperature"],
                "--outf", outf)  # fmt: skip
        assert answer.data["text"] == outf.read_text(encoding="utf-8").rstrip("\n")


def test_a_bad_request_batched_with_good_ones_fails_alone(server):
    """temperature 1e-300 passed the checks once and turned sampling into NaN: every request of its batch
    got 503. Now the range refuses it (400) and the five sent with it are answered."""
    good = MIXED[:5]
    bad = {"prompt": "the old cat", "max_words": 5, "temperature": 1e-300, "seed": 1}
    before = metric_values(server, "DlopsBatches")
    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda r: server.predict_fields("lm", r), [*good, bad]))
    batches = labelled(metric_values(server, "DlopsBatches"), ModelName="lm") - labelled(before, ModelName="lm")
    assert batches < 6, "the six requests were not batched"
    assert [a.status for a in answers] == [200] * 5 + [400], answers
    assert "'temperature' must be >= 0.01" in answers[-1].data["error"]


def test_the_metrics_endpoint_counts_requests_latency_and_errors_per_model(server, tiny_dataset):
    before = metric_values(server, "DlopsRequests")
    image = load_tinyimagenet(tiny_dataset).val[0][0]
    assert server.predict_file("resnet", image).ok
    assert server.predict("lm", b'{"temperature": NaN}', "application/json").status == 400
    after = metric_values(server, "DlopsRequests")
    assert labelled(after, ModelName="lm", Status="400") - labelled(before, ModelName="lm", Status="400") == 1
    assert labelled(after, ModelName="resnet", Status="200") - labelled(before, ModelName="resnet", Status="200") == 1
    for name in ("ts_inference_requests_total", "ts_inference_latency_microseconds"):
        samples = metric_values(server, name)
        assert labelled(samples, model_name="resnet") > 0 and labelled(samples, model_name="lm") > 0, name


def test_the_documented_request_table_is_the_fields_table():
    from serving.handlers.request_fields import GENERATION_FIELDS, markdown_table

    page = (REPO / "docs" / "serving.md").read_text(encoding="utf-8")
    assert markdown_table(GENERATION_FIELDS) in page, "regenerate it: python serving/handlers/request_fields.py"


@pytest.mark.parametrize(("serve_amp", "native", "expected"), [("auto", "1", "bf16"), ("auto", "0", "off"),
                                                              ("off", "1", "off")])  # fmt: skip
def test_the_classifier_serves_in_the_precision_the_device_suits(model_store, tiny_dataset, tmp_path, serve_amp,
                                                                  native, expected):  # fmt: skip
    with zipfile.ZipFile(mar_of(model_store, "resnet")) as zf:
        zf.extractall(tmp_path / "resnet")
    images = [str(p) for p, _ in load_tinyimagenet(tiny_dataset).val]
    script = f"""
import json, sys
sys.path.insert(0, {str(tmp_path / "resnet")!r})
from image_classifier import ImageClassifier
class Context:
    system_properties = {{"model_dir": {str(tmp_path / "resnet")!r}}}
    manifest = json.load(open({str(tmp_path / "resnet" / "MAR-INF" / "MANIFEST.json")!r}))
    def get_all_request_header(self, idx): return {{}}
    def set_response_header(self, idx, key, value): pass
    def get_request_id(self, idx): return None  # TorchServe's Context: the frontend's id
handler = ImageClassifier(); handler.initialize(Context())
answers = handler.handle([{{"body": open(p, "rb").read()}} for p in {images!r}], Context())
print(json.dumps({{"amp": handler.amp, "top1": [a[0]["class"] for a in answers]}}))
"""
    env = {**os.environ, "DLOPS_SERVE_AMP": serve_amp, "DLOPS_CPU_NATIVE_BF16": native}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout.strip().splitlines()[-1])
    assert answer["amp"] == expected and len(answer["top1"]) == len(images)


def test_two_packagings_of_one_model_at_once_both_succeed(checkpoints, tmp_path):
    """torch-model-archiver stages a model's files in TMPDIR/<model name>: two `dlops package resnet` at
    once (two users, two test workers) deleted each other's files until each got a TMPDIR of its own."""
    command = [sys.executable, "-m", "training.cli", "package", "resnet", "--checkpoint", str(checkpoints["resnet"])]
    packagings = [
        subprocess.Popen(
            [*command, "--model-store", str(tmp_path / f"store{i}")],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for i in range(3)
    ]
    said = [p.communicate(timeout=300)[0] for p in packagings]
    assert [p.returncode for p in packagings] == [0, 0, 0], said
    for i in range(3):
        with zipfile.ZipFile(mar_of(tmp_path / f"store{i}", "resnet")) as zf:
            assert {"weights.pt", "dlops_classifier.py", "meta.json"} <= set(zf.namelist())


def test_the_prediction_log_rotates_at_its_cap_and_keeps_the_newest_records(tmp_path):
    from serving.handlers.prediction_log import PredictionLog

    log = PredictionLog(tmp_path, sample=1.0, cap_bytes=4096, model="m", version="3")
    for n in range(200):
        log.append([{"id": f"{n:032d}", "input": {"a": 1.0}, "answer": {"class": "c"}, "n": n}])
    live, rotated = sorted((tmp_path / "m" / "3").iterdir())
    assert rotated.name == live.name + ".1" and max(live.stat().st_size, rotated.stat().st_size) <= 4096
    kept = [json.loads(line)["n"] for path in (rotated, live) for line in path.read_text().splitlines()]
    assert kept == list(range(200 - len(kept), 200)) and len(kept) > 30, "not the newest records, in order"
