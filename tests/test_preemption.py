"""Stopping is normal: real signals to real training processes, mid-epoch checkpoints, resumes that
train exactly as an uninterrupted run, `--resume auto`, DDP ranks that stop together, and no
self-inflicted out-of-memory from too many processes."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import cli_error, dlops_process, latest_run, metric_steps, run_cli
from training.checkpoint import load_checkpoint
from training.jobs.lm.synthetic import write_synthetic_corpus

RESNET = ["-b", "8", "-j", "0", "-p", "1", "--lr", "0.02", "--epochs", "3", "--run-name", "preempted"]
LM = ["--epochs", "2", "--emsize", "16", "--nhid", "16", "--nlayers", "1", "--bptt", "10", "--lr", "5",
      "--log-interval", "2", "--run-name", "preempted-lm"]  # fmt: skip


def stop_when(process, needle: str, signum: int, seen: list[str]) -> float:
    """Send `signum` once `needle` is printed; return when it was sent."""
    for line in process.stdout:
        seen.append(line)
        if needle in line:
            process.send_signal(signum)
            return time.monotonic()
    raise AssertionError(f"{needle!r} never printed:\n{''.join(seen)[-3000:]}")


def history(client, run_id: str, metric: str) -> list[float]:
    return [m.value for m in sorted(client.get_metric_history(run_id, metric), key=lambda m: m.step)]


def same_weights(a: Path, b: Path) -> None:
    first, second = load_checkpoint(a)["model"], load_checkpoint(b)["model"]
    for name, tensor in first.items():
        torch.testing.assert_close(second[name], tensor, rtol=1e-5, atol=1e-6, msg=name)


@pytest.fixture(scope="module")
def straight(tiny_dataset, module_tmp, client):
    """The uninterrupted run every stopped one must end up equal to."""
    out = module_tmp.mktemp("straight")
    run_cli("train", "resnet", tiny_dataset, *RESNET, "--out-dir", out, "--experiment", "test-preempt-straight")
    run = latest_run(client, "test-preempt-straight")
    return run, out / run.info.run_id / "last.pt"


def test_sigterm_mid_epoch_checkpoints_ends_the_run_killed_and_resume_auto_trains_the_rest(
    straight, tiny_dataset, tmp_path, client
):
    args = ["train", "resnet", tiny_dataset, *RESNET, "--out-dir", tmp_path, "--experiment", "test-preempt"]
    process = dlops_process(*args)
    seen: list[str] = []
    sent = stop_when(process, "Epoch: [2][2/6]", signal.SIGTERM, seen)
    seen += process.stdout.readlines()
    assert process.wait(timeout=120) == 143, "".join(seen)[-3000:]  # 128 + SIGTERM
    stopped_in = time.monotonic() - sent
    output = "".join(seen)
    assert "=> epoch 2 step" in output and "(resumable)" in output and "resume with: dlops train resnet" in output
    killed = latest_run(client, "test-preempt")
    assert killed.info.status == "KILLED" and killed.data.tags["stop_reason"].startswith("SIGTERM at epoch 2, step")
    run_dir = tmp_path / killed.info.run_id
    note = json.loads((run_dir / "last.json").read_text())
    assert note["position"]["epoch"] == 2 and note["position"]["step"] >= 2 and not note["finished"]
    assert metric_steps(client, killed.info.run_id, "val/acc1") == [1]
    print(f"SIGTERM to exit: {stopped_in:.1f} s")
    assert stopped_in < 30, "a stop must fit a preemption's grace period"

    resumed = run_cli(*args, "--resume", "auto").output  # the very same command, as a scheduler reruns it
    assert f"--resume auto: continuing {run_dir / 'last.pt'}" in resumed
    assert f"Epoch: [2][{note['position']['step'] + 1}/6]" in resumed and "Epoch: [2][1/6]" not in resumed
    run = client.get_run(killed.info.run_id)
    assert run.info.status == "FINISHED" and "step" in run.data.tags["resumed_at"]
    reference, _ = straight
    for metric in ("train/loss", "train/acc1", "val/loss", "lr"):
        assert metric_steps(client, run.info.run_id, metric) == [1, 2, 3], metric  # every step once
        assert history(client, run.info.run_id, metric) == pytest.approx(
            history(client, reference.info.run_id, metric), rel=1e-5
        ), metric
    same_weights(straight[1], run_dir / "last.pt")
    assert json.loads((run_dir / "last.json").read_text())["finished"] is True
    again = run_cli(*args, "--resume", "auto").output  # finished: the same command starts a new run
    assert "no unfinished run 'preempted'" in again


def test_checkpoint_every_bounds_what_sigkill_loses(straight, tiny_dataset, tmp_path, client):
    args = ["train", "resnet", tiny_dataset, *RESNET, "--out-dir", tmp_path, "--experiment", "test-preempt-kill",
            "--checkpoint-every", "0.01"]  # fmt: skip
    process = dlops_process(*args)
    seen: list[str] = []
    stop_when(process, "epoch 2 step 4 saved", signal.SIGKILL, seen)
    process.wait(timeout=60)
    run = latest_run(client, "test-preempt-kill")
    last = tmp_path / run.info.run_id / "last.pt"
    position = load_checkpoint(last)["position"]
    assert position["epoch"] == 2 and position["step"] >= 4  # at most one step of work lost
    output = run_cli("train", "resnet", "--resume", last, "-j", "0").output
    assert f"step {position['step']} of epoch 2" in output
    assert client.get_run(run.info.run_id).info.status == "FINISHED"
    assert metric_steps(client, run.info.run_id, "train/loss") == [1, 2, 3]
    same_weights(straight[1], last)


def test_sigint_stops_a_language_model_mid_epoch_and_it_resumes_exactly(tmp_path, client):
    corpus = write_synthetic_corpus(tmp_path / "corpus", 200, 30, 30)
    common = ["train", "lm", corpus, *LM]
    run_cli(*common, "--out-dir", tmp_path / "straight", "--experiment", "test-preempt-lm-straight")
    straight = latest_run(client, "test-preempt-lm-straight")
    # a background process of a non-interactive shell ignores SIGINT: give it the default handler back
    process = dlops_process(*common, "--out-dir", tmp_path / "stopped", "--experiment", "test-preempt-lm",
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
    seen: list[str] = []
    stop_when(process, "| epoch   1 |     4/", signal.SIGINT, seen)
    seen += process.stdout.readlines()
    assert process.wait(timeout=120) == 130, "".join(seen)[-3000:]  # 128 + SIGINT
    stopped = latest_run(client, "test-preempt-lm")
    assert stopped.info.status == "KILLED" and stopped.data.tags["stop_reason"].startswith("SIGINT at epoch 1")
    logged_before = metric_steps(client, stopped.info.run_id, "train/loss")
    run_cli("train", "lm", "--resume", tmp_path / "stopped" / stopped.info.run_id / "last.pt")
    run_id = stopped.info.run_id
    assert client.get_run(run_id).info.status == "FINISHED"
    steps = metric_steps(client, run_id, "train/loss")
    assert steps == metric_steps(client, straight.info.run_id, "train/loss") and len(set(steps)) == len(steps)
    assert set(logged_before) < set(steps)
    for metric in ("train/loss", "val/loss"):
        assert history(client, run_id, metric) == pytest.approx(history(client, straight.info.run_id, metric),
                                                                rel=1e-5), metric  # fmt: skip
    same_weights(tmp_path / "straight" / straight.info.run_id / "last.pt",
                 tmp_path / "stopped" / run_id / "last.pt")  # fmt: skip


def test_ddp_ranks_stop_at_the_same_step_and_rank_0_writes(tiny_dataset, tmp_path, client):
    args = ["train", "resnet", tiny_dataset, "-b", "8", "-j", "0", "-p", "1", "--epochs", "2", "--nproc-per-node",
            "2", "--out-dir", tmp_path, "--experiment", "test-preempt-ddp"]  # fmt: skip
    process = dlops_process(*args)
    seen: list[str] = []
    stop_when(process, "Epoch: [1][1/", signal.SIGTERM, seen)  # to the launcher, as `docker stop` sends it
    seen += process.stdout.readlines()
    assert process.wait(timeout=180) == 143, "".join(seen)[-3000:]
    run = latest_run(client, "test-preempt-ddp")
    assert run.info.status == "KILLED"
    (checkpoint,) = tmp_path.glob("*/last.pt")
    position = load_checkpoint(checkpoint)["position"]
    assert position["epoch"] == 1 and "".join(seen).count("(resumable)") == 1  # one writer
    run_cli("train", "resnet", "--resume", checkpoint, "-j", "0")  # a DDP run resumes in one process too
    assert client.get_run(run.info.run_id).info.status == "FINISHED"
    assert metric_steps(client, run.info.run_id, "val/acc1") == [1, 2]


def test_more_processes_than_cores_is_refused_unless_insisted_on(tiny_dataset):
    output = cli_error("train", "resnet", tiny_dataset, "--nproc-per-node", "4096", "--epochs", "1")
    assert "--nproc-per-node 4096 is more than the" in output and "--allow-oversubscribe" in output


def test_a_file_that_is_not_a_checkpoint_is_named(tmp_path):
    bad = tmp_path / "notes.pt"
    bad.write_text("not a checkpoint")
    for command in (["train", "resnet", "--resume", bad], ["package", "resnet", "--checkpoint", bad]):
        output = cli_error(*command)
        assert f"{bad} is not a checkpoint dlops can read" in output and "runs/<run id>/last.pt" in output
        assert "weights_only` set to `False`" not in output  # torch's advice to turn the safety off
