"""One trainer for every job: options declared once, one checkpoint schema (version 1 still loads), a
third job from one declaration, every torchvision classifier, --pretrained and --init-from."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import time

import pytest
import torch
from torchvision import models

from tests.conftest import REPO, artifact_paths, cli_error, latest_run, metric_steps, run_cli
from tests.legacy_checkpoints import write_v1_lm, write_v1_resnet
from tests.toy_job import TOY, ToyConfig
from training import trainer
from training.checkpoint import CheckpointError, copy_matching, load_checkpoint, save_checkpoint
from training.jobs import JobRun, Metric, jobs
from training.jobs.lm import LMConfig
from training.jobs.lm.corpus import load_corpus
from training.jobs.lm.synthetic import write_synthetic_corpus
from training.jobs.resnet import ResNetConfig
from training.jobs.resnet.classifier import build_classifier
from training.jobs.resnet.data.synthetic import write_synthetic_tinyimagenet
from training.jobs.resnet.data.tinyimagenet import load_tinyimagenet
from training.jobs.resnet.weights import torchvision_weights
from training.options import cli_fields

FAST = ["-b", "16", "-j", "0", "-p", "0", "--lr", "0.02"]


# --- options declared once -------------------------------------------------------------------------


def test_every_entry_point_validates_options_the_same_way(tmp_path):
    with pytest.raises(ValueError, match=r"--lr -1\.0: -1\.0 is not in the range x>0"):
        ResNetConfig(lr=-1.0)
    with pytest.raises(ValueError, match=r"--arch 'resnet9000'"):
        ResNetConfig(arch="resnet9000")
    with pytest.raises(ValueError, match=r"--model 'LSTMX'"):
        LMConfig(model="LSTMX")
    assert ResNetConfig(epochs="3").epochs == 3  # converted as Click converts
    # the torchrun entry point reads a JSON config: the same check, the same message
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"batch_size": 0, "dummy": True}))
    result = subprocess.run([sys.executable, "-m", "training.trainer", "--job", "resnet", "--config", str(config)],
                            cwd=REPO, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode != 0 and "--batch-size 0: 0 is not in the range x>=1" in result.stderr
    assert "--lr" in cli_error("train", "resnet", "--dummy", "--lr", "-1")


def test_click_options_come_from_the_config_fields():
    for job in jobs().values():
        help_text = run_cli("train", job.kind, "--help").output
        for field in cli_fields(job.config):
            flag = f"--{field.name.replace('_', '-')}"
            if field.name == "tags":
                flag = "--tag"
            assert flag in help_text or field.name in ("weight_decay",), (job.kind, flag)
    assert "-a, --arch" in run_cli("train", "resnet", "--help").output


# --- one checkpoint schema ---------------------------------------------------------------------------


def test_unknown_checkpoint_version_is_refused(tmp_path):
    save_checkpoint({"kind": "resnet", "format_version": 99}, tmp_path / "future.pt")
    with pytest.raises(CheckpointError, match="format_version 99; this dlops reads versions 1 and 2"):
        load_checkpoint(tmp_path / "future.pt")


def test_version_1_checkpoints_evaluate_resume_generate_and_package(tiny_dataset, tmp_path, client):
    ds = load_tinyimagenet(tiny_dataset)
    experiment = client.get_experiment_by_name("test-v1") or client.get_experiment(client.create_experiment("test-v1"))
    run = client.create_run(experiment.experiment_id, tags={"job": "train-resnet"})
    run_dir = tmp_path / "runs" / run.info.run_id
    state = write_v1_resnet(run_dir / "last.pt", ds.classes, [ds.labels[w] for w in ds.classes], run.info.run_id,
                            str(tiny_dataset), epoch=1, epochs=2, batch_size=16, workers=0, print_freq=0,
                            experiment="test-v1", out_dir=str(tmp_path / "runs"))  # fmt: skip
    upgraded = load_checkpoint(run_dir / "last.pt", kind="resnet")
    assert upgraded["format_version"] == 2 and upgraded["model_config"] == {
        "arch": "resnet18", "num_classes": 4, "stem": "imagenet", "image_size": 64}  # fmt: skip
    assert upgraded["train_state"]["best_value"] == 25.0 and torch.equal(
        upgraded["model"]["fc.weight"], state["model"]["fc.weight"]
    )
    output = run_cli("evaluate", "--checkpoint", run_dir / "last.pt", tiny_dataset, "-b", "8", "-j", "0").output
    assert re.search(r" \* Acc@1 [\d.]+ Acc@5", output)
    output = run_cli("train", "resnet", "--resume", run_dir / "last.pt").output
    assert "resuming run" in output and "Epoch: [1]" not in output
    assert client.get_run(run.info.run_id).info.status == "FINISHED"
    assert metric_steps(client, run.info.run_id, "val/acc1") == [1, 2]  # epoch 1 caught up from the checkpoint
    assert load_checkpoint(run_dir / "last.pt")["format_version"] == 2

    corpus = write_synthetic_corpus(tmp_path / "corpus", 100, 20, 20)
    vocab = load_corpus(corpus).vocab.words
    write_v1_lm(tmp_path / "lm.pt", vocab, "no-such-run", str(corpus), emsize=16, nhid=16, bptt=12)
    run_cli("generate", "--checkpoint", tmp_path / "lm.pt", "--words", "5", "--outf", tmp_path / "g.txt")
    generated = (tmp_path / "g.txt").read_text(encoding="utf-8")
    assert len(re.findall(r"\S+|\n", generated.rstrip("\n"))) >= 5, generated  # 5 words (<eos> is a line break)
    run_cli("package", "lm", "--checkpoint", tmp_path / "lm.pt", "--model-store", tmp_path / "store")
    run_cli("package", "resnet", "--checkpoint", run_dir / "last.pt", "--model-store", tmp_path / "store")
    assert sorted(p.name.split("-")[0] for p in (tmp_path / "store").glob("*.mar")) == ["lm", "resnet"]


# --- a third job from one declaration -----------------------------------------------------------------


def test_a_run_missing_a_method_and_a_spec_naming_an_undeclared_metric_fail_before_training():
    class Incomplete(JobRun):  # a run without evaluate
        def build_data(self):
            return {}

        def model_config(self):
            return {}

        def example_input(self):
            return torch.zeros(1)

        def build_optimization(self, model, steps_per_epoch):
            return None

        def train_epoch(self, model, context):
            return {}

    with pytest.raises(TypeError, match="evaluate"):
        Incomplete(spec=TOY, config=ToyConfig(), runtime=None)
    with pytest.raises(TypeError, match=r"names metrics it does not declare: \['val/r2'\]"):
        TOY.with_changes(best=Metric(name="val/r2", label="R2", higher_is_better=True))


def test_a_third_job_is_one_declaration(tmp_path, client):
    run_dir = trainer.train(TOY, ToyConfig(epochs=3, out_dir=str(tmp_path), device="cpu")).run_dir
    run = latest_run(client, "toy")
    assert run.info.status == "FINISHED" and run.data.params["width"] == "8"
    losses = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "val/loss"), key=lambda m: m.step)]
    assert len(losses) == 3 and losses[-1] < losses[0]
    assert {"checkpoints/best.pt", "checkpoints/last.pt", "learning_curves.png", "model_summary.txt"} <= set(
        artifact_paths(client, run.info.run_id)
    )
    state = load_checkpoint(run_dir / "last.pt", kind="toy")
    assert state["model_config"] == {"width": 8} and state["train_state"]["epoch"] == 3
    version = client.search_model_versions(f"run_id = '{run.info.run_id}'")[0]
    assert version.name == "toy-regression" and version.tags["checkpoint_sha256"]


@pytest.fixture(scope="module")
def toy_installed(module_tmp) -> dict[str, str]:
    """The toy job installed as a plug-in (a dlops.jobs entry point on PYTHONPATH): the environment of a
    `dlops` process that knows it."""
    folder = module_tmp.mktemp("toy-plugin")
    info = folder / "toy_job-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-job\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[dlops.jobs]\ntoy = tests.toy_job:TOY\n")
    return {**os.environ, "PYTHONPATH": f"{folder}:{REPO}", "PYTHONUNBUFFERED": "1"}


def dlops_with_toy(env: dict[str, str], *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "training.cli", *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip


def test_a_job_without_serving_sweeps_and_is_refused_packaging_clearly(toy_installed, tmp_path, client):
    """A sweep over a job that declares no serving registers its best trial's checkpoint file (it crashed
    with AttributeError once); `dlops package` says why there is nothing to package."""
    swept = dlops_with_toy(toy_installed, "sweep", "toy", tmp_path, "--trials", "2", "--param",
                           "lr=choice:0.05,0.1", "--sampler", "random", "--storage",
                           f"sqlite:///{tmp_path / 'optuna.db'}", "--", "--epochs", "2", "--out-dir", tmp_path / "runs",
                           "--registered-model", "toy-swept")  # fmt: skip
    assert swept.returncode == 0, swept.stdout[-3000:] + swept.stderr[-3000:]
    (version,) = client.search_model_versions("name = 'toy-swept'")
    assert version.source.endswith("/checkpoints/best.pt") and version.tags["checkpoint_sha256"]
    checkpoint = next((tmp_path / "runs").rglob("best.pt"))
    refused = dlops_with_toy(toy_installed, "package", "toy", "--checkpoint", checkpoint, "--model-store",
                             tmp_path / "store")  # fmt: skip
    assert refused.returncode == 1 and "the toy job declares no serving" in refused.stderr, refused.stderr
    assert "Traceback" not in refused.stderr


# --- every torchvision classifier ---------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["mobilenet_v3_small", "squeezenet1_1", "vit_b_32", "efficientnet_b0", "swin_t"])
def test_summary_works_for_other_families(arch):
    output = run_cli("summary", "-a", arch, "--num-classes", "10", "--depth", "1").output
    assert "Total params" in output and "[1, 10]" in output


def test_small_stem_is_refused_where_it_does_not_apply_and_the_list_says_where_it_does():
    assert "applies to ResNet, ResNeXt and Wide ResNet models, not vgg11" in cli_error(
        "summary", "-a", "vgg11", "--stem", "small"
    )
    listing = run_cli("summary", "--list").output.splitlines()
    assert "resnet18  (--stem small)" in listing and "vgg11" in listing and len(listing) >= 80
    assert "must be a multiple of 14" in cli_error("summary", "-a", "vit_h_14")
    assert any(line.startswith("inception_v3  (inception_v3 needs inputs of at least 75x75") for line in listing)


def test_a_non_resnet_arch_trains(tiny_dataset, tmp_path, client):
    run_cli("train", "resnet", tiny_dataset, "-a", "mobilenet_v3_small", "--epochs", "1", *FAST, "--out-dir",
            tmp_path, "--experiment", "test-mobilenet")  # fmt: skip
    run = latest_run(client, "test-mobilenet")
    assert run.data.params["arch"] == "mobilenet_v3_small" and metric_steps(client, run.info.run_id, "val/acc1") == [1]


# --- --pretrained and --init-from ---------------------------------------------------------------------


@pytest.fixture()
def torch_home(tmp_path, monkeypatch):
    """An empty torch hub cache (TORCH_HOME) for this test and its subprocesses."""
    home = tmp_path / "torch-home"
    monkeypatch.setenv("TORCH_HOME", str(home))
    return home


def test_pretrained_loads_torchvision_weights_from_the_cache_and_replaces_the_head(
    torch_home, tiny_dataset, tmp_path, client
):
    imagenet = models.resnet18(weights=None, num_classes=1000)  # stands in for the real download
    _, path = torchvision_weights("resnet18")
    assert path.is_relative_to(torch_home)
    path.parent.mkdir(parents=True)
    torch.save(imagenet.state_dict(), path)
    model = build_classifier("resnet18", 4)
    assert copy_matching(model, imagenet.state_dict()) == ["fc.bias", "fc.weight"]
    assert torch.equal(model.conv1.weight, imagenet.conv1.weight) and model.fc.out_features == 4
    output = run_cli("train", "resnet", tiny_dataset, "--pretrained", "--epochs", "1", *FAST, "--out-dir", tmp_path,
                     "--experiment", "test-pretrained").output  # fmt: skip
    assert f"=> --pretrained: torchvision's ImageNet weights from {path}; fresh: fc.bias, fc.weight" in output
    run = latest_run(client, "test-pretrained")
    assert run.data.params["pretrained"] == "True" and run.data.params["pretrained_fresh_tensors"] == "2"


def test_pretrained_offline_fails_within_seconds_naming_the_url_and_the_path(torch_home, tiny_dataset, tmp_path):
    env = {**os.environ, "DLOPS_TORCHVISION_WEIGHTS_URL": "http://127.0.0.1:9/models"}  # nothing listens there
    start = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "training.cli", "train", "resnet", str(tiny_dataset),
                             "--pretrained", "--epochs", "1", *FAST, "--out-dir", str(tmp_path)],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    elapsed = time.monotonic() - start
    assert result.returncode == 1, result.stdout + result.stderr
    _, path = torchvision_weights("resnet18")
    assert "http://127.0.0.1:9/models/resnet18-" in result.stderr and f"put it at {path}" in result.stderr
    assert elapsed < 60, f"took {elapsed:.0f} s"


def test_init_from_a_checkpoint_and_from_the_registry(tiny_dataset, tmp_path, client):
    run_cli("train", "resnet", tiny_dataset, "--epochs", "1", *FAST, "--out-dir", tmp_path, "--experiment",
            "test-init-src", "--registered-model", "test-init-src")  # fmt: skip
    source = latest_run(client, "test-init-src")
    best = tmp_path / source.info.run_id / "best.pt"
    output = run_cli("train", "resnet", tiny_dataset, "--init-from", best, "--epochs", "1", *FAST, "--out-dir",
                     tmp_path, "--experiment", "test-init").output  # fmt: skip
    assert f"--init-from {best}: weights of run {source.info.run_id} epoch 1; fresh: none" in output
    assert latest_run(client, "test-init").data.params["init_from_run_id"] == source.info.run_id
    # from the registry, onto a dataset with another number of classes: the head starts fresh
    three = write_synthetic_tinyimagenet(tmp_path / "three", num_classes=3, train_per_class=8, val_per_class=2,
                                         progress=False)  # fmt: skip
    version = client.search_model_versions(f"run_id = '{source.info.run_id}'")[0].version
    output = run_cli("train", "resnet", three, "--init-from", f"models:/test-init-src/{version}", "--epochs", "1",
                     *FAST, "--out-dir", tmp_path, "--experiment", "test-init").output  # fmt: skip
    assert "fresh: fc.bias, fc.weight" in output
    assert "the checkpoint holds arch 'resnet18', this run trains 'resnet34'" in cli_error(
        "train", "resnet", three, "-a", "resnet34", "--init-from", best, "--epochs", "1", *FAST
    )


def test_a_config_is_frozen_once_validated():
    """Values resolved later (precision, augmentation, loader processes) make a new config, never change it."""
    config = ResNetConfig(lr="0.5")
    assert config.lr == 0.5, "converted as it was built"
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.lr = 1.0
    with pytest.raises(TypeError, match="positional"):
        ResNetConfig(None, 3)  # keyword-only: a swapped argument cannot pass
