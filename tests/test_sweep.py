"""Sweeps: a real Optuna study in SQLite, worker processes, pruning, MLflow parent and child runs,
the best model registered, and a study that continues after its processes were killed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import optuna
import pytest

from tests.conftest import REPO, artifact_paths, cli_error
from training.jobs.lm.synthetic import write_synthetic_corpus

TINY = ["--epochs", "3", "--emsize", "16", "--nhid", "16", "--nlayers", "1", "--batch-size", "10", "--bptt", "20",
        "--log-interval", "1000"]  # fmt: skip
# a tiny learning rate leaves perplexity where it starts: the median pruner has something to prune
SPACE = ["--param", "lr=choice:5,0.000001", "--param", "dropout=float:0.0:0.3"]
# Worker i samples with seed SEED + i; with 10 both workers draw lr 5, 5, then 1e-6: whichever way the
# two processes interleave, a worker's third trial (one of them runs at least three of the six) meets
# two completed lr-5 trials and is pruned. (Seed 3 pruned only when the timing allowed it.)
SEED = "10"


@pytest.fixture(scope="module")
def corpus(module_tmp) -> Path:
    return write_synthetic_corpus(module_tmp.mktemp("sweep-corpus"), 200, 30, 30)


def sweep_command(corpus: Path, tmp: Path, study: str, trials: int = 6) -> list[str]:
    return [sys.executable, "-m", "training.cli", "sweep", "lm", str(corpus), "--trials", str(trials),
            "--processes", "2", *SPACE, "--sampler", "random", "--seed", SEED, "--storage",
            f"sqlite:///{tmp / 'optuna.db'}", "--study-name", study, "--heartbeat", "2", "--", *TINY, "--out-dir",
            str(tmp / "runs"),
            "--experiment", f"sweep-{study}", "--registered-model", f"sweep-{study}"]  # fmt: skip


def children(client, study: str):
    experiment = client.get_experiment_by_name(f"sweep-{study}")
    runs = client.search_runs([experiment.experiment_id], f"tags.sweep_id = '{study}'")
    parent = [r for r in runs if r.data.tags.get("sweep_role") == "parent"]
    return parent, [r for r in runs if r.data.tags.get("sweep_role") != "parent"]


def test_a_study_in_two_processes_prunes_records_and_registers(corpus, tmp_path, client):
    result = subprocess.run(sweep_command(corpus, tmp_path, "two-procs"), cwd=REPO, capture_output=True, text=True,
                            timeout=900, env={**os.environ, "PYTHONUNBUFFERED": "1"})  # fmt: skip
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "=> 2 worker processes:" in result.stdout
    study = optuna.load_study(study_name="two-procs", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    states = Counter(t.state.name for t in study.trials)
    assert states["COMPLETE"] + states["PRUNED"] == 6 and states["PRUNED"] >= 1, states

    (parent,), trials = children(client, "two-procs")
    assert parent.data.params["sampler"] == "random" and parent.data.params["pruner"] == "median"
    assert parent.data.params["study_name"] == "two-procs" and "lr" in parent.data.params["space"]
    assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in trials)
    assert sorted(int(r.data.tags["trial"]) for r in trials) == sorted(t.number for t in study.trials)
    tagged = Counter(r.data.tags["state"] for r in trials)
    assert tagged["complete"] == states["COMPLETE"] and tagged["pruned"] == states["PRUNED"]
    for run in trials:  # the ordinary training-run content
        assert float(run.data.params["lr"]) in (5.0, 1e-6) and "val/ppl" in run.data.metrics
        assert "checkpoints/best.pt" in artifact_paths(client, run.info.run_id)
        pruned = run.data.tags["state"] == "pruned"
        assert run.data.tags["stop_reason"].startswith("pruned") == pruned
    best = study.best_trial
    assert parent.data.tags["best_trial"] == str(best.number)
    assert parent.data.metrics["best/value"] == pytest.approx(best.value)
    # the study optimizes what it is labelled as: each complete trial's value is its run's best val/ppl (the
    # trainer's best value is a val loss, which a sweep logged as the perplexity once)
    complete = [r for r in trials if r.data.tags["state"] == "complete"]
    for run in complete:
        value = study.trials[int(run.data.tags["trial"])].value
        assert value == pytest.approx(min(m.value for m in client.get_metric_history(run.info.run_id, "val/ppl")))
    best_run = next(r for r in trials if r.info.run_id == best.user_attrs["run_id"])
    version = client.search_model_versions("name = 'sweep-two-procs'")[0]
    assert float(version.tags["val_ppl"]) == pytest.approx(best.value, abs=1e-3) and best_run.data.tags
    assert "optimization_history.png" in artifact_paths(client, parent.info.run_id)
    versions = client.search_model_versions("name = 'sweep-two-procs'")
    assert [v.run_id for v in versions] == [best.user_attrs["run_id"]] == [parent.data.tags["best_run_id"]]
    assert "monitoring/reference.jsonl" in artifact_paths(client, best_run.info.run_id, "monitoring")  # drift baseline


def kill_mid_trial(command: list[str], storage: str) -> set[int]:
    """Start the sweep, SIGKILL it (launcher and workers) once 2 trials have finished and a trial is
    between epochs 1 and 3; return the trials left RUNNING in the study."""
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)  # fmt: skip
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.2)
        try:
            trials = optuna.load_study(study_name="killed", storage=storage).trials
        except KeyError:  # not created yet
            continue
        finished = [t for t in trials if t.state.is_finished()]
        midway = [t for t in trials if t.state == optuna.trial.TrialState.RUNNING and len(t.intermediate_values) == 1]
        if len(finished) >= 2 and midway:
            break
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=60)
    trials = optuna.load_study(study_name="killed", storage=storage).trials
    return {t.number for t in trials if t.state == optuna.trial.TrialState.RUNNING}


def test_a_killed_sweep_continues_where_it_stopped_without_counting_a_trial_twice(corpus, tmp_path, client):
    command = sweep_command(corpus, tmp_path, "killed")
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    interrupted: set[int] = set()
    for _ in range(3):  # a trial may end between the last look and the kill: then kill again later
        interrupted = kill_mid_trial(command, storage)
        if interrupted:
            break
    assert interrupted, "never caught a trial running"

    again = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900)  # the same command
    assert again.returncode == 0, again.stdout[-4000:] + again.stderr[-4000:]
    study = optuna.load_study(study_name="killed", storage=storage)
    states = Counter(t.state.name for t in study.trials)
    assert states["COMPLETE"] + states["PRUNED"] == 6 and states["RUNNING"] == 0, states
    assert {t.number for t in study.trials if t.state == optuna.trial.TrialState.FAIL} == interrupted
    (parent,), trials = children(client, "killed")
    numbers = [int(r.data.tags["trial"]) for r in trials]
    assert len(numbers) == len(set(numbers)), "a trial has two runs"
    for run in trials:
        if int(run.data.tags["trial"]) in interrupted:
            assert run.info.status == "FAILED" and run.data.tags["state"] == "failed"
        else:
            assert run.info.status == "FINISHED" and run.data.tags["state"] in ("complete", "pruned")


def test_bad_sweeps_fail_before_any_trial(corpus, tmp_path):
    base = ["sweep", "lm", corpus, "--trials", "2", "--storage", f"sqlite:///{tmp_path / 'o.db'}"]
    assert "has no option 'learning_rate'" in cli_error(*base, "--param", "learning_rate=log:1e-3:1")
    assert "an empty range" in cli_error(*base, "--param", "lr=log:1:0.001")
    assert "expected one of float:..." in cli_error(*base, "--param", "lr=gauss:1:2")
    assert "expected NAME=SPEC" in cli_error(*base, "--param", "lr")
    said = cli_error(*base, "--jobs", "2", "--param", "lr")  # the old name of --processes still works, noted
    assert "--jobs is deprecated; it is --processes now" in said and "expected NAME=SPEC" in said
    assert "not a valid --model" in cli_error(*base, "--param", "model=choice:LSTM,GPT")
    assert "--direction maximize contradicts val/ppl, where lower is better" in cli_error(
        *base, "--param", "lr=log:1e-3:1", "--direction", "maximize"
    )
    assert "both searched (--param) and fixed" in cli_error(*base, "--param", "lr=log:1e-3:1", "--", "--lr", "2")
    assert not (tmp_path / "o.db").exists(), "nothing may start before the space is checked"
