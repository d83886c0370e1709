"""Checkpoint comparison, 2-process DDP through torchrun, and the device benchmark on this machine."""

from __future__ import annotations

import csv
import re
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO, artifact_paths, cli_error, latest_run, metric_steps, run_cli
from training.checkpoint import load_checkpoint
from training.jobs.resnet.classifier import classifier_from_checkpoint
from training.jobs.resnet.data.dataset import open_rgb
from training.jobs.resnet.data.images import eval_transform
from training.jobs.resnet.data.synthetic import write_synthetic_tinyimagenet
from training.jobs.resnet.data.tinyimagenet import load_tinyimagenet

FAST = ["-b", "16", "-j", "0", "--print-freq", "0"]


@pytest.fixture(scope="module")
def two_checkpoints(tiny_dataset, module_tmp, client):
    out = module_tmp.mktemp("compare-runs")
    paths = []
    # small batches: enough BatchNorm updates for eval-mode predictions that are not all one class
    for seed, epochs in ((1, "2"), (2, "1")):
        run_cli("train", "resnet", tiny_dataset, "--epochs", epochs, "-b", "4", "-j", "0", "-p", "0", "--lr", "0.01",
                "--seed", seed,
                "--out-dir", out, "--experiment", "test-compare-src")  # fmt: skip
        run = latest_run(client, "test-compare-src")
        paths.append((out / run.info.run_id / "best.pt", run.info.run_id))
    return paths


def test_compare_lists_exactly_the_images_classified_differently(two_checkpoints, tiny_dataset, tmp_path, client):
    (a, run_a), (b, run_b) = two_checkpoints
    output = run_cli("compare", a, b, tiny_dataset, "-b", "5", "-j", "0", "--out-dir", tmp_path,
                     "--experiment", "test-compare").output  # fmt: skip

    # brute force: every image alone through each model, file names from the dataset listing
    models = [classifier_from_checkpoint(load_checkpoint(p)) for p in (a, b)]
    transform = eval_transform(64)
    expected = {}
    with torch.no_grad():
        for path, _ in load_tinyimagenet(tiny_dataset).val:
            x = transform(open_rgb(path))[None]
            pa, pb = (int(m(x).argmax()) for m in models)
            if pa != pb:
                expected[path.name] = (pa, pb)
    assert expected, "the two checkpoints should disagree somewhere for this test to mean anything"

    with (tmp_path / "disagreements.csv").open(encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert {r["file"] for r in rows} == set(expected)
    classes = load_checkpoint(a)["classes"]
    for r in rows:
        assert (classes.index(r["a_class"]), classes.index(r["b_class"])) == expected[r["file"]]
        assert (tiny_dataset / "val" / "images" / r["file"]).is_file()
    confidence = [max(float(r["a_confidence"]), float(r["b_confidence"])) for r in rows]
    assert confidence == sorted(confidence, reverse=True), "most confident disagreements first"
    agreement = 100 * (1 - len(expected) / 16)
    assert f"agreement {agreement:.2f}% on 16 val images; {len(expected)} disagreements" in output

    run = latest_run(client, "test-compare", job="compare")
    assert (run.data.tags["source_run_a"], run.data.tags["source_run_b"]) == (run_a, run_b)
    assert {"disagreements.csv", "disagreements.png"} <= set(artifact_paths(client, run.info.run_id))
    assert run.data.metrics["disagreements"] == len(expected)
    png = (tmp_path / "disagreements.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > (5_000 if expected else 1_000)


def test_compare_refuses_different_class_lists(two_checkpoints, tmp_path, client):
    other = write_synthetic_tinyimagenet(tmp_path / "other", num_classes=3, train_per_class=4, val_per_class=2,
                                         progress=False)  # fmt: skip
    run_cli("train", "resnet", other, "--epochs", "1", *FAST, "--out-dir", tmp_path, "--experiment", "test-compare-3")
    three = tmp_path / latest_run(client, "test-compare-3").info.run_id / "best.pt"
    output = cli_error("compare", two_checkpoints[0][0], three, other)
    assert "different class lists (4 vs 3 classes)" in output


def test_two_process_ddp_through_torchrun_logs_one_run(tiny_dataset, tmp_path, client):
    command = [sys.executable, "-m", "training.cli", "train", "resnet", str(tiny_dataset), "--epochs", "2", *FAST,
               "--nproc-per-node", "2", "--out-dir", str(tmp_path), "--experiment", "test-ddp",
               "--tag", "case=ddp"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "torch.distributed.run" in result.stdout
    exp = client.get_experiment_by_name("test-ddp")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1, "only rank 0 logs"
    run = runs[0]
    assert run.data.params["world_size"] == "2" and run.data.params["global_batch_size"] == "16"
    assert run.data.params["per_process_batch_size"] == "8" and run.data.tags["case"] == "ddp"
    for metric in ("train/loss", "val/acc1", "train/images"):
        assert metric_steps(client, run.info.run_id, metric) == [1, 2], metric
    # every image once per epoch across both processes, as in a single process
    assert [m.value for m in client.get_metric_history(run.info.run_id, "train/images")] == [48, 48]
    assert sorted(p.name for p in tmp_path.iterdir()) == [run.info.run_id]
    assert {p.name for p in (tmp_path / run.info.run_id).glob("*.pt")} == {"best.pt", "last.pt"}
    assert load_checkpoint(tmp_path / run.info.run_id / "last.pt")["train_state"]["epoch"] == 2


def test_bench_devices_runs_cpu_and_reports_cuda_skipped(tiny_dataset, client):
    output = run_cli("bench", "devices", tiny_dataset, "--configs", "cpu,cuda:1,cuda:2", "--epochs", "1",
                     "--workers", "0", "--experiment", "test-bench", "--", "-b", "16", "-p", "0").output  # fmt: skip
    assert re.search(r"^cpu\s+1\s+0\s+1\s+[\d.]+\s+[\d.]+\s+[\d.]+%\s+[\d.]+$", output, re.MULTILINE), output
    if not torch.cuda.is_available():
        assert re.search(r"^cuda:1\s+1\s+- skipped: .*CUDA", output, re.MULTILINE), output
        assert re.search(r"^cuda:2\s+2\s+- skipped: .*", output, re.MULTILINE), output
    comparison = re.search(r"comparison id (\w+)", output).group(1)
    run = latest_run(client, "test-bench", comparison_id=comparison)
    assert run.data.tags["bench_config"] == "cpu" and run.data.params["workers"] == "0"
