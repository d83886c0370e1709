"""TorchServe end to end: package both models, serve them on loopback, query them, refuse bad input."""

from __future__ import annotations

import base64
import json
import os
import re
import socket
import struct
import subprocess
import sys
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from serving.client import generate_http, post, predict_image
from serving.server import ServeOptions, start, stop
from tests.conftest import REPO, artifact_paths, cli_error, latest_run, run_cli
from training.checkpoint import load_checkpoint
from training.data.images import ImageFiles, eval_transform
from training.data.synthetic import write_synthetic_corpus
from training.data.tinyimagenet import load_tinyimagenet
from training.models.classifier import classifier_from_checkpoint

pytestmark = pytest.mark.skipif(
    subprocess.run(["which", "java"], capture_output=True).returncode != 0,
    reason="TorchServe needs Java (.ci/run installs it)",
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def checkpoints(tiny_dataset, tmp_path_factory, client):
    out = tmp_path_factory.mktemp("serve-runs")
    run_cli("train", "resnet", tiny_dataset, "--epochs", "1", "-b", "16", "-j", "0", "--lr", "0.02", "--out-dir", out,
            "--experiment", "test-serve", "--registered-model", "test-serve-resnet")  # fmt: skip
    resnet_run = latest_run(client, "test-serve", job="train-resnet")
    corpus = write_synthetic_corpus(tmp_path_factory.mktemp("serve-corpus"), 200, 30, 30)
    run_cli("train", "lm", corpus, "--epochs", "1", "--emsize", "16", "--nhid", "16", "--nlayers", "1",
            "--bptt", "20", "--lr", "5", "--out-dir", out, "--experiment", "test-serve",
            "--registered-model", "test-serve-lm")  # fmt: skip
    lm_run = latest_run(client, "test-serve", job="train-lm")
    return {"resnet": out / resnet_run.info.run_id / "best.pt", "lm": out / lm_run.info.run_id / "best.pt",
            "resnet_run": resnet_run.info.run_id, "lm_run": lm_run.info.run_id}  # fmt: skip


@pytest.fixture(scope="module")
def model_store(checkpoints, tmp_path_factory, client):
    store = tmp_path_factory.mktemp("model_store")
    # one from the registry, one from a run id: both resolve to the best checkpoint
    version = client.search_model_versions(f"run_id = '{checkpoints['resnet_run']}'")[0].version
    run_cli("package", "resnet", "--model-uri", f"models:/test-serve-resnet/{version}", "--model-store", store)
    run_cli("package", "lm", "--run-id", checkpoints["lm_run"], "--model-store", store)
    return store


@pytest.fixture(scope="module")
def server(model_store, tmp_path_factory):
    options = ServeOptions(
        model_store=model_store,
        state_dir=tmp_path_factory.mktemp("torchserve"),
        inference_port=free_port(),
        management_port=free_port(),
        metrics_port=free_port(),
        grpc_inference_port=free_port(),
        grpc_management_port=free_port(),
        workers=1,
        batch_size=4,
        max_batch_delay_ms=50,
        amp="off",  # fp32, so that HTTP answers equal the fp32 evaluation below bit for bit
    )
    keys = start(options)
    yield options, keys
    stop()


def test_mar_is_logged_to_its_run_and_the_version_is_tagged(model_store, checkpoints, client):
    assert "serving/resnet.mar" in artifact_paths(client, checkpoints["resnet_run"])
    assert "serving/lm.mar" in artifact_paths(client, checkpoints["lm_run"])
    version = client.search_model_versions(f"run_id = '{checkpoints['resnet_run']}'")[0]
    assert version.tags["mar"] == f"runs:/{checkpoints['resnet_run']}/serving/resnet.mar"
    with zipfile.ZipFile(model_store / "resnet.mar") as zf:
        names = set(zf.namelist())
        meta = json.loads(zf.read("meta.json"))
    assert {"image_classifier.py", "handler_common.py", "dlops_classifier.py", "meta.json", "weights.pt"} <= names
    assert meta["run_id"] == checkpoints["resnet_run"] and len(meta["labels"]) == 4


def test_http_top1_equals_local_evaluation_for_every_val_image(server, checkpoints, tiny_dataset):
    options, _ = server
    state = load_checkpoint(checkpoints["resnet"])
    model = classifier_from_checkpoint(state)
    val = load_tinyimagenet(tiny_dataset).val
    images = ImageFiles(val, eval_transform(64))
    with torch.no_grad():
        local = model(torch.stack([images[i][0] for i in range(len(images))])).argmax(1).tolist()
    with ThreadPoolExecutor(8) as pool:  # concurrent requests exercise server-side batching
        answers = list(pool.map(lambda s: predict_image(s[0], options.inference_port, options.state_dir), val))
    for (path, _), (status, answer), expected in zip(val, answers, local, strict=True):
        assert status == 200, answer
        assert len(answer) == 4 and answer[0]["wnid"] == state["classes"][expected], path.name
        assert answer[0]["label"] == state["labels"][expected]
        assert sum(a["probability"] for a in answer) == pytest.approx(1.0, abs=1e-4)


def test_topk_from_header_multipart_and_json(server, tiny_dataset):
    options, keys = server
    image = load_tinyimagenet(tiny_dataset).val[0][0]
    status, answer = predict_image(image, options.inference_port, options.state_dir, topk=2)
    assert status == 200 and len(answer) == 2
    body = json.dumps({"image": base64.b64encode(image.read_bytes()).decode(), "topk": 3}).encode()
    status, answer = post(f"http://127.0.0.1:{options.inference_port}/predictions/resnet", body, "application/json",
                          options.state_dir)  # fmt: skip
    assert status == 200 and len(answer) == 3
    boundary = "dlopsboundary"
    form = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="data"; filename="x.jpg"\r\n'
            f"Content-Type: image/jpeg\r\n\r\n"
        ).encode()
        + image.read_bytes()
        + (f'\r\n--{boundary}\r\nContent-Disposition: form-data; name="topk"\r\n\r\n1\r\n--{boundary}--\r\n').encode()
    )
    status, answer = post(f"http://127.0.0.1:{options.inference_port}/predictions/resnet", form,
                          f"multipart/form-data; boundary={boundary}", options.state_dir)  # fmt: skip
    assert status == 200 and len(answer) == 1


def test_http_generation_equals_cli_generation(server, checkpoints, tmp_path):
    options, _ = server
    outf = tmp_path / "cli.txt"
    run_cli("generate", "--checkpoint", checkpoints["lm"], "--prompt", "the old cat", "--words", "30",
            "--seed", "42", "--temperature", "0.8", "--outf", outf)  # fmt: skip
    status, answer = generate_http({"prompt": "the old cat", "max_words": 30, "seed": 42, "temperature": 0.8},
                                   options.inference_port, options.state_dir)  # fmt: skip
    assert status == 200, answer
    assert answer["text"] == outf.read_text(encoding="utf-8").rstrip("\n")
    assert answer["words"] == 30 and answer["unknown_words"] == []
    status, answer = generate_http({"prompt": "the Atlantis cat", "max_words": 3, "seed": 1},
                                   options.inference_port, options.state_dir)  # fmt: skip
    assert status == 200 and answer["unknown_words"] == ["Atlantis"]


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


def worker_pids(options: ServeOptions, keys: dict, model: str) -> list[int]:
    import urllib.request

    request = urllib.request.Request(f"http://127.0.0.1:{options.management_port}/models/{model}",
                                     headers={"Authorization": f"Bearer {keys['management']}"})  # fmt: skip
    with urllib.request.urlopen(request, timeout=10) as response:
        return [w["pid"] for w in json.loads(response.read())[0]["workers"]]


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
        ("lm", b'{"temperature": 0}', "application/json", 400, "'temperature' must be > 0"),
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
    options, keys = server
    image = load_tinyimagenet(tiny_dataset).val[0][0].read_bytes()
    body = {"TRUNCATED": image[: len(image) // 2], "BOMB": bomb_png()}.get(body, body)
    before = worker_pids(options, keys, model)
    got, answer = post(f"http://127.0.0.1:{options.inference_port}/predictions/{model}", body, content_type,
                       options.state_dir)  # fmt: skip
    assert got == status and message in answer["error"], answer
    assert worker_pids(options, keys, model) == before, "the worker restarted"
    if model == "resnet":
        assert predict_image(load_tinyimagenet(tiny_dataset).val[1][0], options.inference_port,
                             options.state_dir)[0] == 200  # fmt: skip
    else:
        assert generate_http({"max_words": 2}, options.inference_port, options.state_dir)[0] == 200


def test_requests_without_the_token_are_refused(server, tiny_dataset, tmp_path):
    options, keys = server
    assert keys.get("inference"), "token authorization should be on by default"
    image = load_tinyimagenet(tiny_dataset).val[0][0]
    status, answer = predict_image(image, options.inference_port, tmp_path)  # no key file there: no token
    assert status in (400, 401) and "Token Authorization failed" in json.dumps(answer)


def test_handler_runs_from_the_unpacked_archive_without_the_project(model_store, tiny_dataset, tmp_path):
    """The .mar needs torch, torchvision and Pillow only: importing training/serving is blocked."""
    for mar in ("resnet.mar", "lm.mar"):
        with zipfile.ZipFile(model_store / mar) as zf:
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


def metric_values(options: ServeOptions, name: str) -> dict[str, float]:
    """The metrics endpoint's samples of one metric: labels text -> value."""
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{options.metrics_port}/metrics", timeout=10) as response:
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
    options, _ = server
    send = lambda r: generate_http(r, options.inference_port, options.state_dir)  # noqa: E731
    alone = [send(r) for r in MIXED]
    before = metric_values(options, "DlopsBatches"), metric_values(options, "DlopsRequests")
    with ThreadPoolExecutor(len(MIXED)) as pool:
        together = list(pool.map(send, MIXED))
    after = metric_values(options, "DlopsBatches"), metric_values(options, "DlopsRequests")
    batches = labelled(after[0], ModelName="lm") - labelled(before[0], ModelName="lm")
    requests = labelled(after[1], ModelName="lm", Status="200") - labelled(before[1], ModelName="lm", Status="200")
    assert requests == len(MIXED) and batches < requests, "the concurrent requests were not batched"
    for request, (status_a, a), (status_b, b) in zip(MIXED, alone, together, strict=True):
        assert status_a == status_b == 200, (a, b)
        assert a == b, request
        assert a["words"] == request["max_words"]
    for request, (_, answer) in zip(MIXED[:3], alone[:3], strict=True):
        outf = tmp_path / f"seed{request['seed']}.txt"
        run_cli("generate", "--checkpoint", checkpoints["lm"], "--prompt", request["prompt"], "--words",
                request["max_words"], "--seed", request["seed"], "--temperature", request["temperature"],
                "--outf", outf)  # fmt: skip
        assert answer["text"] == outf.read_text(encoding="utf-8").rstrip("\n")


def test_the_metrics_endpoint_counts_requests_latency_and_errors_per_model(server, tiny_dataset):
    options, _ = server
    before = metric_values(options, "DlopsRequests")
    image = load_tinyimagenet(tiny_dataset).val[0][0]
    assert predict_image(image, options.inference_port, options.state_dir)[0] == 200
    bad = post(f"http://127.0.0.1:{options.inference_port}/predictions/lm", b'{"temperature": NaN}',
               "application/json", options.state_dir)  # fmt: skip
    assert bad[0] == 400
    after = metric_values(options, "DlopsRequests")
    assert labelled(after, ModelName="lm", Status="400") - labelled(before, ModelName="lm", Status="400") == 1
    assert labelled(after, ModelName="resnet", Status="200") - labelled(before, ModelName="resnet", Status="200") == 1
    for name in ("ts_inference_requests_total", "ts_inference_latency_microseconds"):
        samples = metric_values(options, name)
        assert labelled(samples, model_name="resnet") > 0 and labelled(samples, model_name="lm") > 0, name


def test_the_readme_request_table_is_the_fields_table():
    from serving.handlers.request_fields import GENERATION_FIELDS, markdown_table

    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert markdown_table(GENERATION_FIELDS) in readme, "regenerate it: python serving/handlers/request_fields.py"


@pytest.mark.parametrize(("serve_amp", "native", "expected"), [("auto", "1", "bf16"), ("auto", "0", "off"),
                                                              ("off", "1", "off")])  # fmt: skip
def test_the_classifier_serves_in_the_precision_the_device_suits(model_store, tiny_dataset, tmp_path, serve_amp,
                                                                  native, expected):  # fmt: skip
    with zipfile.ZipFile(model_store / "resnet.mar") as zf:
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
handler = ImageClassifier(); handler.initialize(Context())
answers = handler.handle([{{"body": open(p, "rb").read()}} for p in {images!r}], Context())
print(json.dumps({{"amp": handler.amp, "top1": [a[0]["wnid"] for a in answers]}}))
"""
    env = {**os.environ, "DLOPS_SERVE_AMP": serve_amp, "DLOPS_CPU_NATIVE_BF16": native}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout.strip().splitlines()[-1])
    assert answer["amp"] == expected and len(answer["top1"]) == len(images)
