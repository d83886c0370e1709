"""Served versions watched: a real TorchServe serving a ResNet and an LM with the prediction log on, a
real Prometheus scraping it, real Evidently judging logged windows against the versions' reference
profiles, feedback joined by request id, the monitor page in a real browser (Playwright), and a log
that cannot be written (a file in its way, a full disk) costing no request."""

from __future__ import annotations

import io
import json
import math
import random
import shutil
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image, ImageEnhance

from monitoring import prometheus
from monitoring.runs import DRIFT_SHARE, LIVE_PREFIX, LOGGED_REQUESTS, REGISTERED_PREFIX, REPORT_FOLDER
from serving.client import REQUEST_ID_HEADER, VERSION_HEADER, ServerClient
from serving.server import ServeOptions, stop
from tests.conftest import MINI_TINYIMAGENET, SHARED_DATA, free_port, run_cli
from training.cli import main
from training.jobs.lm.corpus import sample_prompts
from training.jobs.lm.synthetic import write_synthetic_corpus
from training.jobs.resnet.data.synthetic import write_synthetic_tinyimagenet
from training.jobs.resnet.data.tinyimagenet import load_tinyimagenet
from training.tracking.tags import DRIFT_VERDICT, MONITOR_RUN

NEEDS = "monitoring needs Java (TorchServe) and Prometheus (.ci/run installs both)"
pytestmark = pytest.mark.skipif(shutil.which("java") is None or shutil.which("prometheus") is None, reason=NEEDS)

RESNET, LM = "test-monitor-resnet", "test-monitor-lm"
SAMPLE = 0.5  # the share of requests the log keeps
WIKITEXT = SHARED_DATA / "wikitext-2"
# prompts in another language: what the LM never saw (German, from the Grundgesetz and a weather report)
FOREIGN = """Die Würde des Menschen ist unantastbar. Sie zu achten und zu schützen ist Verpflichtung aller
staatlichen Gewalt. Das Deutsche Volk bekennt sich darum zu unverletzlichen und unveräußerlichen
Menschenrechten als Grundlage jeder menschlichen Gemeinschaft, des Friedens und der Gerechtigkeit in der Welt.
Morgen ziehen von Westen her dichte Wolken auf, im Laufe des Nachmittags fällt gebietsweise kräftiger Regen.
Die Höchstwerte liegen zwischen zwölf und sechzehn Grad, in höheren Lagen bleibt es deutlich kühler.
In der Nacht lockert die Bewölkung allmählich auf, örtlich bildet sich Nebel, die Tiefstwerte sinken auf vier Grad."""


def image_subset(root: Path, classes: int = 30, train_per_class: int = 20) -> Path:
    """The first `classes` classes of the real Tiny-ImageNet slice in its own layout (all their val images)."""
    wnids = (MINI_TINYIMAGENET / "wnids.txt").read_text().split()[:classes]
    (root / "val" / "images").mkdir(parents=True)
    (root / "wnids.txt").write_text("\n".join(wnids) + "\n")
    shutil.copy(MINI_TINYIMAGENET / "words.txt", root / "words.txt")
    for wnid in wnids:
        shutil.copytree(MINI_TINYIMAGENET / "train" / wnid / "images", root / "train" / wnid / "images",
                        ignore=lambda _, names: sorted(names)[train_per_class:])  # fmt: skip
    lines = [line for line in (MINI_TINYIMAGENET / "val" / "val_annotations.txt").read_text().splitlines()
             if line.split("\t")[1] in wnids]  # fmt: skip
    for line in lines:
        shutil.copy(MINI_TINYIMAGENET / "val" / "images" / line.split("\t")[0], root / "val" / "images")
    (root / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return root


def corpus_subset(root: Path, lines: int = 1000) -> Path:
    """The first `lines` lines of each WikiText-2 split (a vocabulary small enough to train in seconds)."""
    root.mkdir(parents=True)
    for split in ("train", "valid", "test"):
        text = (WIKITEXT / f"{split}.txt").read_text(encoding="utf-8").splitlines(keepends=True)[:lines]
        (root / f"{split}.txt").write_text("".join(text), encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def data(module_tmp) -> dict[str, Path]:
    """Real data where ../shared/data has it (the ResNet's drift needs real photos), generated otherwise."""
    images = module_tmp.mktemp("images") / "tin"
    if MINI_TINYIMAGENET.is_dir():
        image_subset(images)
    else:
        write_synthetic_tinyimagenet(images, num_classes=8, train_per_class=12, val_per_class=40, progress=False)
    corpus = module_tmp.mktemp("text") / "corpus"
    if (WIKITEXT / "valid.txt").is_file():
        corpus_subset(corpus)
    else:
        write_synthetic_corpus(corpus, train_lines=600, valid_lines=200, test_lines=200)
    return {"images": images, "corpus": corpus}


@pytest.fixture(scope="module")
def server(data, module_tmp):
    """Both jobs trained (one epoch), registered with their reference profiles, and served with the log on."""
    out = module_tmp.mktemp("runs")
    run_cli("train", "resnet", data["images"], "--epochs", "1", "-b", "32", "-j", "0", "-p", "0", "--out-dir", out,
            "--experiment", "test-monitor", "--registered-model", RESNET)  # fmt: skip
    run_cli("train", "lm", data["corpus"], "--epochs", "1", "--emsize", "32", "--nhid", "32", "--batch-size", "20",
            "--bptt", "20", "--log-interval", "50", "--out-dir", out, "--experiment", "test-monitor",
            "--registered-model", LM)  # fmt: skip
    options = ServeOptions.on_free_ports(model_store=module_tmp.mktemp("store"), state_dir=module_tmp.mktemp("ts"))
    run_cli("serve", "--model", f"models:/{RESNET}/1", "--model", f"models:/{LM}/1", "--no-auth",
            "--state-dir", options.state_dir, "--model-store", options.model_store, "--log-sample", SAMPLE,
            "--inference-port", options.inference_port, "--management-port", options.management_port,
            "--metrics-port", options.metrics_port, "--grpc-inference-port", options.grpc_inference_port,
            "--grpc-management-port", options.grpc_management_port)  # fmt: skip
    yield options.state_dir
    prometheus.stop(options.state_dir)
    stop(options.state_dir)


def send(state_dir: Path, model: str, bodies: list[bytes], content_type: str) -> list:
    """Each body as one request, from 4 client threads; the answers in order."""
    client = ServerClient.of(state_dir)
    with ThreadPoolExecutor(4) as pool:
        return list(pool.map(lambda body: client.predict(model, body, content_type), bodies))


def jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def val_images(data: dict[str, Path]) -> list[tuple[Path, str]]:
    return [(Path(path), label) for path, label in load_tinyimagenet(data["images"]).val]


def logged(state_dir: Path, model: str, version: str = "1") -> list[dict]:
    folder = state_dir / "predictions" / model / version
    return [json.loads(line) for path in sorted(folder.glob("predictions-*.jsonl*"))
            for line in path.read_text().splitlines()]  # fmt: skip


def drift(state_dir: Path, uri: str, since: float, tmp_path: Path) -> tuple[int, str]:
    """`dlops monitor drift URI` over the requests since `since`: its exit code and output."""
    window = f"{time.time() - since + 1:.0f}s"
    args = ["monitor", "drift", uri, "--window", window, "--state-dir", str(state_dir), "--report-dir", str(tmp_path)]
    result = CliRunner().invoke(main, args)
    return result.exit_code, result.output


# --- the prediction log ---------------------------------------------------------------------------------------


def test_every_answer_carries_a_request_id_and_the_log_keeps_the_sampled_share(server, data):
    before = len(logged(server, "resnet"))
    images = val_images(data)[:120]
    answers = send(server, "resnet", [path.read_bytes() for path, _ in images], "application/octet-stream")
    assert {a.status for a in answers} == {200}
    ids = {a.headers[REQUEST_ID_HEADER] for a in answers}
    assert len(ids) == len(answers), "request ids repeat"
    records = logged(server, "resnet")[before:]
    n, share = len(answers), len(records) / len(answers)
    assert abs(share - SAMPLE) <= 3 * math.sqrt(SAMPLE * (1 - SAMPLE) / n), f"{len(records)} of {n} logged"
    answered = {a.headers[REQUEST_ID_HEADER]: a for a in answers}
    for record in records:
        assert record["id"] in answered, "a logged request id that no answer carried"
        answer = answered[record["id"]]
        assert record["version"] == answer.headers[VERSION_HEADER] == "1"
        assert record["answer"]["class"] == answer.data[0]["class"]
        assert set(record["input"]) >= {"width", "height", "mean_r", "std_b", "edges", "embedding"}
        assert "image" not in json.dumps(record), "the log holds a summary, never the input"


# --- Prometheus -----------------------------------------------------------------------------------------------


def requests_counted(url: str, model: str) -> dict[str, float]:
    return {r["metric"]["Version"]: float(r["value"][1])
            for r in prometheus.query(url, f'dlops:requests:total{{ModelName="{model}"}}')}  # fmt: skip


def test_prometheus_counts_each_versions_requests_as_the_client_did(server, data):
    port = free_port()
    run_cli("monitor", "prometheus", "start", "--state-dir", server, "--port", port, "--interval", "1")
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 20
    while not requests_counted(url, "resnet") and time.monotonic() < deadline:  # the first scrape
        time.sleep(0.5)
    before = requests_counted(url, "resnet").get("1", 0.0)
    bodies = [path.read_bytes() for path, _ in val_images(data)[:40]] + [b"not an image"] * 5
    answers = send(server, "resnet", bodies, "application/octet-stream")
    assert [a.status for a in answers].count(400) == 5
    expected = before + len(answers)
    deadline = time.monotonic() + 20
    while requests_counted(url, "resnet").get("1") != expected and time.monotonic() < deadline:
        time.sleep(0.5)
    assert requests_counted(url, "resnet") == {"1": expected}, "Prometheus and the client disagree"
    time.sleep(2)  # the recording rules' next evaluation
    p99 = prometheus.query(url, 'dlops:latency_seconds:p99_1m{ModelName="resnet"}')
    assert p99 and 0 < float(p99[0]["value"][1]) < 10, p99
    errors = prometheus.query(url, 'dlops:errors:ratio1m{ModelName="resnet"}')
    assert errors and float(errors[0]["value"][1]) > 0, "the 400s are not in the error rate"


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is not installed (apt-get install -y chromium)")
def test_the_monitor_page_shows_the_versions_in_a_browser_without_console_errors(server, tmp_path):
    assert prometheus.read_record(server), "runs after the Prometheus test, which starts it"
    run_cli("monitor", "--state-dir", server, "--window", "10m", "--out", tmp_path)
    from playwright.sync_api import sync_playwright

    errors: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page()
        page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.goto((tmp_path / "monitor.html").as_uri())
        rows = page.locator("table").first.locator("tr").all_inner_texts()
        widths = page.eval_on_selector_all("img", "images => images.map(i => i.naturalWidth)")
        browser.close()
    assert not errors, errors
    assert any(row.startswith("resnet\t1") for row in rows), rows
    assert len(widths) == 2 and min(widths) > 400, "a model's pictures did not render"


# --- drift ----------------------------------------------------------------------------------------------------


@pytest.mark.skipif(not MINI_TINYIMAGENET.is_dir(), reason=f"the ResNet's drift needs real photos: {MINI_TINYIMAGENET}")
def test_the_resnets_drift_check_tells_val_images_from_darker_turned_or_foreign_ones(server, data, client, tmp_path):
    images = val_images(data)
    originals = random.Random(0).sample(images, 160)
    foreign = write_synthetic_tinyimagenet(tmp_path / "shapes", num_classes=8, train_per_class=1, val_per_class=20,
                                           progress=False)  # fmt: skip
    cases = {
        "as they are": [path.read_bytes() for path, _ in originals],
        "darker": [jpeg(ImageEnhance.Brightness(Image.open(p).convert("RGB")).enhance(0.5)) for p, _ in originals],
        "turned": [jpeg(Image.open(path).convert("RGB").rotate(90)) for path, _ in originals],
        "another dataset": [p.read_bytes() for p, _ in load_tinyimagenet(foreign).val],
    }
    for case, bodies in cases.items():
        since = time.time()
        assert {a.status for a in send(server, "resnet", bodies, "application/octet-stream")} == {200}
        code, said = drift(server, f"models:/{RESNET}/1", since, tmp_path)
        assert (code, case) == ((0, case) if case == "as they are" else (1, case)), said
        version = client.get_model_version(RESNET, "1")
        run = client.get_run(version.tags[MONITOR_RUN])
        assert version.tags[DRIFT_VERDICT] == ("no drift" if code == 0 else "drift")
        assert run.data.metrics[LOGGED_REQUESTS] >= 50 and DRIFT_SHARE in run.data.metrics
    assert any(a.path.endswith("evidently_report.html") for a in client.list_artifacts(run.info.run_id, REPORT_FOLDER))


def test_the_lms_drift_check_tells_its_corpus_from_another_language(server, data, client, tmp_path):
    corpus_prompts = sample_prompts(data["corpus"] / "test.txt", 140, seed=1)
    foreign = tmp_path / "foreign.txt"
    foreign.write_text(FOREIGN, encoding="utf-8")
    for case, prompts, expected in (("its corpus", corpus_prompts, 0),
                                    ("German", sample_prompts(foreign, 140, seed=1), 1)):  # fmt: skip
        since = time.time()
        bodies = [json.dumps({"prompt": p, "max_words": 2, "seed": i}).encode() for i, p in enumerate(prompts)]
        assert {a.status for a in send(server, "lm", bodies, "application/json")} == {200}
        code, said = drift(server, f"models:/{LM}/1", since, tmp_path)
        assert (code, case) == (expected, case), said


def test_too_few_logged_requests_is_not_enough_data_never_no_drift(server, client, tmp_path):
    since = time.time()
    send(server, "lm", [json.dumps({"prompt": "the game", "max_words": 1}).encode()] * 6, "application/json")
    code, said = drift(server, f"models:/{LM}/1", since, tmp_path)
    assert code == 3 and "not enough data" in said, said
    assert client.get_model_version(LM, "1").tags[DRIFT_VERDICT] == "not enough data"


# --- feedback -------------------------------------------------------------------------------------------------


def test_feedback_gives_the_accuracy_computed_from_the_answers(server, data, client, tmp_path):
    images = val_images(data)[:100]
    answers = send(server, "resnet", [path.read_bytes() for path, _ in images], "application/octet-stream")
    # a barely trained model is rarely right: every other truth confirms the answer, the others are the labels
    truth = {a.headers[REQUEST_ID_HEADER]: a.data[0]["class"] if i % 2 else label
             for i, (a, (_, label)) in enumerate(zip(answers, images, strict=True))}  # fmt: skip
    sampled = {record["id"] for record in logged(server, "resnet")} & set(truth)
    expected = sum(1 for a in answers if a.headers[REQUEST_ID_HEADER] in sampled
                   and a.data[0]["class"] == truth[a.headers[REQUEST_ID_HEADER]]) / len(sampled)  # fmt: skip
    feedback = tmp_path / "truth.csv"
    feedback.write_text("request_id,truth\n" + "".join(f"{i},{label}\n" for i, label in truth.items()))
    said = run_cli("feedback", feedback, "--model", RESNET, "--state-dir", server).output
    run = client.get_run(client.get_model_version(RESNET, "1").tags[MONITOR_RUN])
    assert 0.3 < expected < 1
    assert run.data.metrics[LIVE_PREFIX + "accuracy"] == pytest.approx(expected), said
    assert run.data.metrics["feedback_matched"] == len(sampled)
    registered = client.get_run(client.get_model_version(RESNET, "1").run_id).data.metrics["best/val_acc1"]
    assert run.data.metrics[REGISTERED_PREFIX + "accuracy"] == pytest.approx(registered / 100)


# --- a log that cannot be written -----------------------------------------------------------------------------


def warnings_said(state_dir: Path) -> int:
    return (state_dir / "logs" / "model_log.log").read_text(errors="replace").count("cannot be written")


def test_an_unwritable_log_answers_every_request_and_says_so_once(server):
    folder = server / "predictions" / "lm" / "1"
    kept = folder.with_name("kept")
    folder.rename(kept)
    folder.write_text("a file where the log's folder was")
    try:
        bodies = [json.dumps({"prompt": "the game", "max_words": 1, "seed": i}).encode() for i in range(30)]
        assert {a.status for a in send(server, "lm", bodies, "application/json")} == {200}
        time.sleep(1)
        assert warnings_said(server) == 1
    finally:
        folder.unlink()
        kept.rename(folder)


def test_a_full_log_disk_answers_every_request_and_says_so_once(server, data):
    folder = server / "predictions" / "resnet" / "1"
    kept = folder.with_name("kept")
    folder.rename(kept)
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(folder)], capture_output=True)
    if mounted.returncode != 0:
        folder.rmdir()
        kept.rename(folder)
        pytest.skip(f"a full disk is a tmpfs mount here, refused: {mounted.stderr.decode().strip()}")
    try:
        with open(folder / "filler", "wb", buffering=0) as filler, pytest.raises(OSError):
            while True:  # until the disk is full
                filler.write(b"\0" * 4096)
        said = warnings_said(server)
        bodies = [path.read_bytes() for path, _ in val_images(data)[:30]]
        assert {a.status for a in send(server, "resnet", bodies, "application/octet-stream")} == {200}
        time.sleep(1)
        assert warnings_said(server) == said + 1
    finally:
        subprocess.run(["umount", str(folder)], check=True)
        folder.rmdir()
        kept.rename(folder)
