"""`dlops report`: sections checked against MlflowClient's view of the same runs, sections omitted
when the runs hold no such data, and the page loaded in headless Chromium when it is installed."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from tests.conftest import artifact_paths, latest_run, run_cli
from training.checkpoint import load_checkpoint, save_checkpoint
from training.jobs.lm.synthetic import write_synthetic_corpus
from training.report.collect import overfitting_epoch

FAST = ["-b", "8", "-j", "0", "-p", "0"]


def fmt(value: float, digits: int = 2) -> str:
    return f"{value:,.{digits}f}"


@pytest.fixture(scope="module")
def recorded(tiny_dataset, module_tmp, client):
    """Two ResNet runs that differ in lr, an evaluation and a comparison of them; an LM run that generated text."""
    out = module_tmp.mktemp("report-runs")
    for lr in ("0.02", "0.05"):
        run_cli("train", "resnet", tiny_dataset, "--epochs", "3", *FAST, "--lr", lr, "--out-dir", out,
                "--experiment", "report-resnet", "--run-name", f"lr-{lr}")  # fmt: skip
    runs = client.search_runs([client.get_experiment_by_name("report-resnet").experiment_id],
                              "tags.job = 'train-resnet'", order_by=["attributes.start_time ASC"])  # fmt: skip
    a, b = (out / r.info.run_id / "best.pt" for r in runs)
    run_cli("evaluate", "--checkpoint", a, tiny_dataset, "-b", "8", "-j", "0")
    run_cli("compare", a, b, tiny_dataset, "-b", "8", "-j", "0", "--out-dir", out / "compare",
            "--experiment", "report-resnet")  # fmt: skip
    corpus = write_synthetic_corpus(module_tmp.mktemp("report-corpus"), 200, 30, 30)
    run_cli("train", "lm", corpus, "--epochs", "3", "--emsize", "16", "--nhid", "16", "--nlayers", "1", "--bptt", "20",
            "--lr", "5", "--out-dir", out, "--experiment", "report-lm", "--run-name", "lstm")  # fmt: skip
    lm = latest_run(client, "report-lm")
    run_cli("generate", "--checkpoint", out / lm.info.run_id / "best.pt", "--words", "20", "--seed", "3",
            "--outf", out / "generated.txt")  # fmt: skip
    return {"resnet": runs, "lm": client.get_run(lm.info.run_id), "out": out}


def build(tmp_path: Path, *args: str) -> tuple[str, str, Path]:
    out = tmp_path / "report"
    output = run_cli("report", *args, "--out", out, "--mlflow-url", "http://127.0.0.1:5000").output
    assert "=> report of" in output
    return (out / "report.html").read_text(encoding="utf-8"), (out / "report.md").read_text(encoding="utf-8"), out


def test_resnet_report_sections_match_mlflow(recorded, tmp_path, client):
    html, md, out = build(tmp_path, "--experiment", "report-resnet")
    for run in recorded["resnet"]:
        run_id, metrics = run.info.run_id, run.data.metrics
        assert f'href="http://127.0.0.1:5000/#/experiments/{run.info.experiment_id}/runs/{run_id}"' in html
        row = re.search(rf'runs/{run_id}">{run.info.run_name}</a></td>(.*?)</tr>', html, re.S).group(1)
        cells = re.findall(r"<td[^>]*>(.*?)</td>", row, re.S)
        acc5 = max(m.value for m in client.get_metric_history(run_id, "val/acc5"))
        assert cells[0] == "resnet" and cells[1] == run.data.params["lr"]  # lr is what differs
        assert cells[2:4] == [fmt(metrics["best/val_acc1"]), fmt(acc5)] and cells[4] == "3"
        assert cells[5] == fmt(metrics["time/total_seconds"], 1)
        assert f"| [{run.info.run_name}](http://127.0.0.1:5000/#/experiments/" in md
    assert "<th>lr</th>" in html and "<th>momentum</th>" not in html  # only the params that vary
    assert 'id="curves"' in html and html.count("data:image/png;base64,") >= 1
    assert (out / "report_files" / "curves-resnet.png").stat().st_size > 10_000
    assert "![learning curves of 2 runs (resnet)](report_files/curves-resnet.png)" in md
    # the evaluation and the comparison, with the first disagreements and their images
    evaluation = latest_run(client, "report-resnet", job="evaluate")
    assert f'<td class="num">{fmt(evaluation.data.metrics["eval/acc1"])}</td>' in html
    compare = latest_run(client, "report-resnet", job="compare")
    assert f"Agreement {fmt(100 * compare.data.metrics['agreement'])}% on 16 images" in html
    if compare.data.metrics["disagreements"]:
        assert 'class="thumb" src="data:image/png;base64,' in html
    # the layer table, the environment, and what is absent: no LM, no device benchmark
    assert "Total params: 11,178,564" in html and 'id="environment"' in html
    assert recorded["resnet"][0].data.tags["torch_version"] in html
    assert 'id="language"' not in html and 'id="bench"' not in html and "val ppl" not in html


def test_language_model_report_sections_match_mlflow(recorded, tmp_path, client):
    lm = recorded["lm"]
    html, md, _ = build(tmp_path, lm.info.run_id)
    history = sorted(client.get_metric_history(lm.info.run_id, "val/ppl"), key=lambda m: m.step)
    for point in history:
        assert f'<td class="num">{point.step}</td><td class="num">{fmt(point.value)}</td>' in html
    assert f'<th class="num">{fmt(lm.data.metrics["test/ppl"])}</th>' in html
    generated = [a for a in artifact_paths(client, lm.info.run_id) if a.startswith("generated/")]
    text = Path(client.download_artifacts(lm.info.run_id, generated[-1], str(tmp_path))).read_text(encoding="utf-8")
    assert text.split()[0] in html and "Generated by lstm" in md
    assert 'id="evaluation"' not in html and "Acc@1" not in html and 'id="bench"' not in html


def test_device_benchmark_section(tiny_dataset, tmp_path, client):
    output = run_cli("bench", "devices", tiny_dataset, "--configs", "cpu", "--epochs", "1", "--workers", "0",
                     "--experiment", "report-bench", "--", "-b", "16", "-p", "0").output  # fmt: skip
    comparison = re.search(r"comparison id (\w+)", output).group(1)
    html, _, _ = build(tmp_path, "--comparison", comparison)
    run = latest_run(client, "report-bench", comparison_id=comparison)
    rate = client.get_metric_history(run.info.run_id, "time/images_per_second")[0].value
    assert 'id="bench"' in html and f'<td class="num">{fmt(rate, 1)}</td>' in html


def disagreeing_copy(checkpoint: Path, target: Path) -> Path:
    """`checkpoint` with its classifier's rows rolled by one class: it predicts the next class for every image,
    so a comparison with the original disagrees everywhere (two barely trained models may agree everywhere)."""
    state = load_checkpoint(checkpoint)
    for name in [k for k in state["model"] if k.endswith(("fc.weight", "fc.bias"))]:
        state["model"][name] = torch.roll(state["model"][name], 1, dims=0)
    save_checkpoint(state, target)
    return target


def test_names_from_runs_write_nothing_outside_out_and_land_escaped(recorded, tiny_dataset, tmp_path, client):
    """A run's name is chosen by whoever logs it: `../../x` must not place a picture outside --out, and
    HTML or Markdown in it must show as text in report.md."""
    a = recorded["out"] / recorded["resnet"][0].info.run_id / "best.pt"  # (tmp_path holds the report alone)
    run_cli("compare", a, disagreeing_copy(a, recorded["out"] / "rolled.pt"), tiny_dataset, "-b", "8", "-j", "0",
            "--out-dir", recorded["out"] / "compare-names", "--experiment", "report-names")  # fmt: skip
    compare = latest_run(client, "report-names", job="compare")
    assert compare.data.metrics["disagreements"] > 0, "the comparison needs disagreements: their thumbnails"
    run = recorded["resnet"][0]
    evil = "<script>alert(1)</script> | [x](http://evil.example)"
    client.update_run(compare.info.run_id, name="../../x")
    client.update_run(run.info.run_id, name=evil)
    try:
        out = tmp_path / "a" / "b" / "report"
        run_cli("report", "--experiment", "report-resnet", "--experiment", "report-names", "--out", out)
    finally:
        client.update_run(compare.info.run_id, name=compare.info.run_name)
        client.update_run(run.info.run_id, name=run.info.run_name)
    outside = [p for p in tmp_path.rglob("*") if p.is_file() and out not in p.parents]
    assert outside == [], outside
    pictures = sorted(p.name for p in (out / "report_files").iterdir())
    assert any(name.startswith("x-0-") for name in pictures), pictures  # the thumbnail, renamed
    md = (out / "report.md").read_text(encoding="utf-8")
    assert "<script>" not in md and "&lt;script&gt;alert(1)&lt;/script&gt; \\| \\[x\\](http://evil.example)" in md
    assert "](http://evil.example)" not in md.replace("\\](http://evil.example)", "")
    html = (out / "report.html").read_text(encoding="utf-8")
    assert "<script>alert" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html


def test_overfitting_starts_after_the_validation_minimum_when_training_still_improves():
    train = [(1, 2.0), (2, 1.5), (3, 1.0), (4, 0.6)]
    assert overfitting_epoch(train, [(1, 2.1), (2, 1.7), (3, 1.8), (4, 2.2)]) == 3
    assert overfitting_epoch(train, [(1, 2.1), (2, 1.7), (3, 1.6), (4, 1.5)]) is None
    assert overfitting_epoch([(1, 1.0), (2, 1.2)], [(1, 2.0), (2, 2.5)]) is None  # train got worse too


def test_an_unknown_selection_is_a_clear_error(tmp_path):
    from tests.conftest import cli_error

    assert "no such experiment" in cli_error("report", "--experiment", "never-made", "--out", tmp_path)
    assert "no runs match sweep 'nope'" in cli_error("report", "--sweep", "nope", "--out", tmp_path)


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is not installed (apt-get install -y chromium)")
def test_the_report_renders_in_headless_chromium(recorded, tmp_path):
    _, _, out = build(tmp_path, "--experiment", "report-resnet")
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}"]  # fmt: skip
    page = (out / "report.html").as_uri()
    dom = subprocess.run([CHROMIUM, *flags, "--dump-dom", page], capture_output=True, text=True, timeout=120).stdout
    assert '<h2 id="overview">Runs</h2>' in dom and '<h2 id="curves">' in dom
    shot = tmp_path / "report.png"
    subprocess.run([CHROMIUM, *flags, "--window-size=1300,2400", f"--screenshot={shot}", page],
                   capture_output=True, timeout=120, check=True)  # fmt: skip
    from PIL import Image

    with Image.open(shot) as image:
        colours = len(set(image.convert("RGB").resize((200, 300)).getdata()))
    assert colours > 50, "the page rendered blank"
