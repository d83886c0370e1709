"""ResNet training end to end on generated data, checked through a real MLflow store."""

from __future__ import annotations

import re
import signal
from pathlib import Path

import pytest
import torch

from tests.conftest import (
    MINI_TINYIMAGENET,
    artifact_paths,
    cli_error,
    dlops_process,
    latest_run,
    metric_steps,
    run_cli,
)
from training.checkpoint import load_checkpoint

EPOCH_METRICS = [
    "train/loss",
    "train/acc1",
    "train/acc5",
    "val/loss",
    "val/acc1",
    "val/acc5",
    "lr",
    "time/epoch_seconds",
    "time/images_per_second",
    "time/data_wait_share",
]
FAST = ["-b", "16", "-j", "0", "--print-freq", "1", "--lr", "0.02"]


@pytest.fixture(scope="module")
def trained(tiny_dataset: Path, module_tmp, client):
    """One 2-epoch run shared by the tests below."""
    out = module_tmp.mktemp("runs")
    result = run_cli(
        "train",
        "resnet",
        tiny_dataset,
        "--epochs",
        "2",
        *FAST,
        "--out-dir",
        out,
        "--experiment",
        "test-resnet",
        "--run-name",
        "two-epochs",
        "--registered-model",
        "test-resnet",
    )
    run = latest_run(client, "test-resnet")
    return run, Path(out) / run.info.run_id, result.output


def test_console_lines_follow_the_imagenet_example(trained):
    _, _, output = trained
    assert "=> using device cpu" in output and "auto:" in output
    assert re.search(
        r"Epoch: \[1\]\[\s*1/3\]  Time\s+[\d.]+  Data\s+[\d.]+  Loss [\d.e+-]+  Acc@1\s+[\d.]+  Acc@5", output
    )
    assert re.search(r"Test: \[1/1\]", output)
    assert len(re.findall(r" \* Acc@1 [\d.]+ Acc@5 [\d.]+", output)) == 2


def test_run_holds_params_metrics_artifacts_and_a_registered_version(trained, client):
    run, run_dir, _ = trained
    params = run.data.params
    for name in (
        "arch",
        "batch_size",
        "epochs",
        "lr",
        "momentum",
        "weight_decay",
        "workers",
        "seed",
        "stem",
        "amp",
        "channels_last",
        "compile",
        "augment",
        "label_smoothing",
        "scheduler",
        "early_stop_patience",
        "experiment",
        "run_name",
        "device",
        "data",
    ):
        assert name in params, name
    assert params["epochs"] == "2" and params["batch_size"] == "16"
    for metric in EPOCH_METRICS:
        assert metric_steps(client, run.info.run_id, metric) == [1, 2], metric
    tags = run.data.tags
    for tag in (
        "torch_version",
        "torchvision_version",
        "cuda_version",
        "device_name",
        "cpu_count",
        "git_commit",
        "dataset",
        "train_images",
        "val_images",
    ):
        assert tag in tags, tag
    assert tags["train_images"] == "48" and tags["val_images"] == "16"
    assert tags["stop_reason"] == "completed 2 epochs"
    artifacts = artifact_paths(client, run.info.run_id)
    assert {"checkpoints/best.pt", "checkpoints/last.pt", "model_summary.txt"} <= set(artifacts)
    assert any(a.startswith("tensorboard/events.out.tfevents") for a in artifacts)
    assert any(m.startswith("system/cpu_utilization") for m in run.data.metrics), "system metrics missing"
    versions = client.search_model_versions(f"run_id = '{run.info.run_id}'")
    assert len(versions) == 1 and versions[0].name == "test-resnet"
    logged = client.get_logged_model(versions[0].source.removeprefix("models:/"))  # an MLflow model of the run
    assert logged.source_run_id == run.info.run_id and str(logged.status) == "READY"


def test_checkpoint_is_complete_and_loads_weights_only(trained):
    run, run_dir, _ = trained
    state = load_checkpoint(run_dir / "last.pt", kind="resnet")
    assert state["run_id"] == run.info.run_id and state["train_state"]["epoch"] == 2
    for key in ("model", "optimizer", "scheduler", "scaler", "rng", "config", "classes", "labels"):
        assert key in state, key
    assert len(state["classes"]) == 4
    torch.load(run_dir / "best.pt", weights_only=True)  # raises if anything needs unpickling code


def test_evaluate_matches_the_training_runs_val_accuracy(trained, tiny_dataset, client):
    run, run_dir, _ = trained
    best = load_checkpoint(run_dir / "best.pt")
    output = run_cli("evaluate", "--checkpoint", run_dir / "best.pt", tiny_dataset, "-b", "16", "-j", "0").output
    assert re.search(r"Test: \[1/1\]\s+Time", output)
    acc1 = float(re.search(r" \* Acc@1 ([\d.]+) Acc@5", output).group(1))
    assert acc1 == pytest.approx(best["metrics"]["val/acc1"], abs=1e-3)
    evaluation = latest_run(client, "test-resnet", job="evaluate")
    assert evaluation.data.tags["source_run_id"] == run.info.run_id
    assert evaluation.data.metrics["eval/acc1"] == pytest.approx(acc1, abs=1e-3)


def test_evaluate_refuses_a_dataset_with_other_classes(trained, tmp_path):
    from training.jobs.resnet.data.synthetic import write_synthetic_tinyimagenet

    _, run_dir, _ = trained
    other = write_synthetic_tinyimagenet(
        tmp_path / "other", num_classes=3, train_per_class=1, val_per_class=1, progress=False
    )
    assert "different ones" in cli_error("evaluate", "--checkpoint", run_dir / "best.pt", other)


def test_resume_after_sigkill_continues_the_same_run(tiny_dataset, tmp_path, client):
    args = ["train", "resnet", tiny_dataset, "--epochs", "3", *FAST, "--experiment", "test-resume"]
    run_cli(*args, "--out-dir", tmp_path / "straight", "--run-name", "straight")
    straight = latest_run(client, "test-resume")

    proc = dlops_process(*args, "--out-dir", tmp_path / "killed", "--run-name", "killed")
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith("=> epoch saved"):
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "".join(seen)
    killed = latest_run(client, "test-resume")
    assert killed.info.status == "RUNNING" and killed.info.run_id != straight.info.run_id
    # killed right after the checkpoint: epoch 1's metrics may or may not have reached MLflow yet;
    # either way the resumed run must end with each epoch logged exactly once
    assert metric_steps(client, killed.info.run_id, "val/acc1") in ([], [1])

    last = tmp_path / "killed" / killed.info.run_id / "last.pt"
    output = run_cli("train", "resnet", "--resume", last, "-j", "0").output
    assert "resuming run" in output and "Epoch: [1]" not in output
    resumed = client.get_run(killed.info.run_id)
    assert resumed.info.status == "FINISHED"
    for metric in EPOCH_METRICS:
        assert (
            metric_steps(client, resumed.info.run_id, metric)
            == metric_steps(client, straight.info.run_id, metric)
            == [1, 2, 3]
        ), metric
    assert resumed.data.tags["resumed_after_epoch"] == "1"
    # RNG states and a per-epoch data order are restored: the resumed run trains exactly like the straight one
    for metric in ("train/loss", "val/loss"):
        values = [[m.value for m in sorted(client.get_metric_history(r.info.run_id, metric), key=lambda m: m.step)]
                  for r in (straight, resumed)]  # fmt: skip
        assert values[0] == pytest.approx(values[1], rel=1e-5), metric


def test_resume_refuses_to_change_what_the_run_logged(trained):
    _, run_dir, _ = trained
    assert "cannot change --lr" in cli_error("train", "resnet", "--resume", run_dir / "last.pt", "--lr", "0.5")


def mislabel_val(dataset: Path) -> None:
    """Label every val image as the next class: the better a model fits train, the worse val gets."""
    annotations = dataset / "val" / "val_annotations.txt"
    wnids = sorted((dataset / "wnids.txt").read_text().split())
    lines = []
    for line in annotations.read_text().splitlines():
        fields = line.split("\t")
        fields[1] = wnids[(wnids.index(fields[1]) + 1) % len(wnids)]
        lines.append("\t".join(fields))
    annotations.write_text("\n".join(lines) + "\n")


def test_early_stopping_records_why(tiny_dataset, tmp_path, client):
    # val labels contradict train labels, so val loss must rise as training fits: patience 1 stops early
    # (at lr 0.05 the fp32 run of an AVX2-only CPU kept improving val loss for all 6 epochs)
    import shutil

    data = Path(shutil.copytree(tiny_dataset, tmp_path / "mislabelled"))
    mislabel_val(data)
    run_cli("train", "resnet", data, "--epochs", "6", "-b", "8", "-j", "0", "-p", "0", "--lr", "0.02",
            "--early-stop-patience", "1", "--out-dir", tmp_path, "--experiment", "test-early-stop")  # fmt: skip
    run = latest_run(client, "test-early-stop")
    reason = run.data.tags["stop_reason"]
    epochs = metric_steps(client, run.info.run_id, "val/loss")
    assert reason.startswith("early stop: val loss has not improved for 1 epochs"), reason
    assert len(epochs) < 6
    losses = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "val/loss"), key=lambda m: m.step)]
    assert losses[-1] >= min(losses[:-1]), "stopped although the last epoch improved val loss"


def test_cuda_request_without_cuda_fails_clearly(tiny_dataset):
    output = cli_error("train", "resnet", "--dummy", "--device", "cuda", "--epochs", "1")
    assert "--device cuda was requested" in output
    assert ("no CUDA support" in output) if torch.version.cuda is None else ("no CUDA device is visible" in output)


def test_cuda_explanations_cover_every_case():
    from training.devices import explain_cuda_unusable

    assert "torch.version.cuda is None" in explain_cuda_unusable(None, 0, None)
    assert "no CUDA device is visible" in explain_cuda_unusable("13.0", 0, None)
    assert "only 1 CUDA device" in explain_cuda_unusable("13.0", 1, 3)
    assert explain_cuda_unusable("13.0", 2, 1) is None


def test_summary_prints_the_layer_table():
    output = run_cli("summary", "-a", "resnet18", "--stem", "small", "--image-size", "64").output
    assert re.search(r"Conv2d \(conv1\)\s+\[1, 3, 64, 64\]\s+\[1, 64, 64, 64\]\s+1,728", output)
    assert "Identity (maxpool)" in output and "Total params: 11,271,432" in output


def test_dummy_data_trains_without_files(tmp_path, client):
    run_cli(
        "train",
        "resnet",
        "--dummy",
        "--limit-train",
        "32",
        "--limit-val",
        "16",
        "--epochs",
        "1",
        *FAST,
        "--out-dir",
        tmp_path,
        "--experiment",
        "test-dummy",
    )
    assert latest_run(client, "test-dummy").data.tags["dataset"] == "dummy"


@pytest.mark.skipif(not MINI_TINYIMAGENET.is_dir(), reason=f"real data not found at {MINI_TINYIMAGENET}")
def test_one_short_epoch_on_real_mini_tinyimagenet(tmp_path, client):
    run_cli(
        "train",
        "resnet",
        MINI_TINYIMAGENET,
        "--epochs",
        "1",
        "--limit-train",
        "400",
        "--limit-val",
        "200",
        "-b",
        "50",
        "-j",
        "2",
        "--print-freq",
        "4",
        "--out-dir",
        tmp_path,
        "--experiment",
        "test-real",
    )
    run = latest_run(client, "test-real")
    assert run.data.tags["num_classes"] == "200" and run.data.tags["train_images"] == "400"
    assert metric_steps(client, run.info.run_id, "val/acc1") == [1]
