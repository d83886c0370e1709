"""Word-level LM: corpus handling, five model types, MLflow content, checkpoints and generation."""

from __future__ import annotations

import getpass
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, WIKITEXT_VALID, artifact_paths, cli_error, latest_run, metric_steps, run_cli
from training.checkpoint import load_checkpoint
from training.data.errors import DatasetError
from training.jobs.lm.corpus import EOS, UNK, batchify, load_corpus
from training.jobs.lm.loop import evaluate_lm
from training.jobs.lm.synthetic import write_synthetic_corpus
from training.jobs.lm.wordlm import lm_from_checkpoint

TINY = ["--emsize", "16", "--nhid", "16", "--nlayers", "1", "--nhead", "2", "--batch-size", "10",
        "--bptt", "20", "--log-interval", "10", "--lr", "5"]  # fmt: skip


@pytest.fixture(scope="module")
def corpus_dir(module_tmp) -> Path:
    return write_synthetic_corpus(module_tmp.mktemp("corpus"), train_lines=300, valid_lines=40, test_lines=40)


@pytest.fixture(scope="module")
def lstm_run(corpus_dir, module_tmp, client):
    out = module_tmp.mktemp("lm-runs")
    result = run_cli("train", "lm", corpus_dir, "--model", "LSTM", "--epochs", "2", *TINY, "--out-dir", out,
                     "--experiment", "test-lm", "--registered-model", "test-lm")  # fmt: skip
    run = latest_run(client, "test-lm", job="train-lm")
    return run, out / run.info.run_id, result.output


@pytest.mark.parametrize("model", ["RNN_TANH", "RNN_RELU", "LSTM", "GRU", "Transformer"])
def test_every_model_type_trains_and_validation_perplexity_drops(model, corpus_dir, tmp_path, client):
    lr = "1" if model == "Transformer" else "5"
    run_cli("train", "lm", corpus_dir, "--model", model, "--epochs", "2", *TINY, "--lr", lr,
            "--out-dir", tmp_path, "--experiment", f"test-lm-{model}")  # fmt: skip
    run = latest_run(client, f"test-lm-{model}")
    history = sorted(client.get_metric_history(run.info.run_id, "val/ppl"), key=lambda m: m.step)
    assert [m.step for m in history] == [1, 2]
    assert history[1].value < history[0].value, f"{model}: val ppl {history[0].value} -> {history[1].value}"


def test_console_lines_follow_the_example(lstm_run):
    _, _, output = lstm_run
    assert re.search(
        r"\| epoch   1 \|\s+10/\s+\d+ batches \| lr 5\.00 \| ms/batch\s+[\d.]+ \| loss\s+[\d.]+ \| ppl\s+[\d.]+", output
    )
    assert re.search(r"\| end of epoch   2 \| time:\s+[\d.]+s \| valid loss\s+[\d.]+ \| valid ppl\s+[\d.]+", output)
    assert re.search(r"\| End of training \| test loss\s+[\d.]+ \| test ppl\s+[\d.]+", output)


def test_run_holds_params_metrics_artifact_and_registry(lstm_run, client):
    run, _, _ = lstm_run
    for name in (
        "model",
        "emsize",
        "nhid",
        "nlayers",
        "nhead",
        "dropout",
        "tied",
        "lr",
        "clip",
        "epochs",
        "batch_size",
        "bptt",
        "seed",
        "log_interval",
        "device",
        "amp",
        "dry_run",
        "data",
    ):
        assert name in run.data.params, name
    batches = int(re.search(r"/\s*(\d+) batches", lstm_run[2]).group(1))
    intervals = [b for b in range(1, batches + 1) if b % 10 == 0]
    assert metric_steps(client, run.info.run_id, "train/loss") == intervals + [batches + b for b in intervals]
    for metric in ("val/loss", "val/ppl", "time/epoch_seconds", "time/tokens_per_second", "lr"):
        assert metric_steps(client, run.info.run_id, metric) == [1, 2], metric
    assert "test/ppl" in run.data.metrics and run.data.tags["vocab_size"].isdigit()
    assert {"checkpoints/best.pt", "checkpoints/last.pt", "model_summary.txt"} <= set(
        artifact_paths(client, run.info.run_id)
    )
    versions = client.search_model_versions(f"run_id = '{run.info.run_id}'")
    assert [v.name for v in versions] == ["test-lm"]


def test_reloaded_checkpoint_reproduces_the_logged_perplexity(lstm_run, corpus_dir, client):
    run, run_dir, _ = lstm_run
    state = load_checkpoint(run_dir / "best.pt", kind="lm")  # weights_only=True
    model = lm_from_checkpoint(state)
    corpus = load_corpus(corpus_dir)
    assert corpus.vocab.words == state["vocab"], "the checkpoint carries the vocabulary"
    ppl = evaluate_lm(model, batchify(corpus.valid, 10), torch.device("cpu"), "off", 20).ppl
    logged = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "val/ppl")}
    assert ppl == pytest.approx(logged[state["epoch"]], rel=1e-5)


def test_resume_continues_the_same_run(corpus_dir, tmp_path, client):
    run_cli("train", "lm", corpus_dir, "--epochs", "1", *TINY, "--out-dir", tmp_path, "--experiment", "test-lm-resume")
    first = latest_run(client, "test-lm-resume")
    last = tmp_path / first.info.run_id / "last.pt"
    assert "cannot change --lr" in cli_error("train", "lm", "--resume", last, "--lr", "1")
    run_cli("train", "lm", "--resume", last, "--epochs", "2")
    steps = metric_steps(client, first.info.run_id, "train/loss")
    assert len(steps) == len(set(steps)) and metric_steps(client, first.info.run_id, "val/loss") == [1, 2]
    assert latest_run(client, "test-lm-resume").info.run_id == first.info.run_id


def test_generation_is_seeded_utf8_and_logged(lstm_run, tmp_path, client):
    run, run_dir, _ = lstm_run
    ckpt = run_dir / "best.pt"
    outputs = []
    for seed, name in ((7, "a.txt"), (7, "b.txt"), (8, "c.txt")):
        run_cli("generate", "--checkpoint", ckpt, "--words", "80", "--seed", seed, "--outf", tmp_path / name)
        outputs.append((tmp_path / name).read_text(encoding="utf-8"))
    assert outputs[0] == outputs[1] and outputs[0] != outputs[2]
    assert len(outputs[0].split()) >= 80 - outputs[0].count("\n")
    assert any(a.startswith("generated/seed7-") for a in artifact_paths(client, run.info.run_id))


def test_generation_survives_a_non_utf8_console(lstm_run, tmp_path):
    _, run_dir, _ = lstm_run
    env = {**os.environ, "PYTHONIOENCODING": "ascii", "LC_ALL": "C", "LANG": "C"}
    out = tmp_path / "generated.txt"
    proc = subprocess.run(
        [sys.executable, "-m", "training.cli", "generate", "--checkpoint", run_dir / "best.pt", "--words", "300",
         "--prompt", "the naïve Ångström café", "--outf", out, "--log-interval", "100"],
        capture_output=True, env=env, cwd=REPO, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    stdout = proc.stdout.decode("ascii")  # the console got only ASCII
    assert "| Generated 100/300 words" in stdout and "read as <unk>: \\xc5ngstr\\xf6m" in stdout
    text = out.read_bytes().decode("utf-8")
    assert text.startswith("the naïve Ångström café") and re.search(r"[^\x00-\x7f]", text[25:])


def test_generation_refuses_a_non_positive_temperature(lstm_run):
    _, run_dir, _ = lstm_run
    assert "--temperature" in cli_error("generate", "--checkpoint", run_dir / "best.pt", "--temperature", "0")


def test_missing_and_empty_splits_are_clear_errors(corpus_dir, tmp_path):
    for name in ("train.txt", "valid.txt"):
        (tmp_path / name).write_text((corpus_dir / name).read_text(encoding="utf-8"), encoding="utf-8")
    with pytest.raises(DatasetError, match=r"the test split is missing \(expected test.txt or wiki.test.tokens\)"):
        load_corpus(tmp_path)
    (tmp_path / "test.txt").write_text("\n \n", encoding="utf-8")
    with pytest.raises(DatasetError, match=r"test.txt: holds no words"):
        load_corpus(tmp_path)


@pytest.mark.skipif(not WIKITEXT_VALID.is_file(), reason=f"real text not found at {WIKITEXT_VALID}")
def test_vocabulary_unk_and_eos_on_real_wikitext(tmp_path):
    lines = WIKITEXT_VALID.read_text(encoding="utf-8").splitlines(keepends=True)
    parts = {"train.txt": lines[:2000], "valid.txt": lines[2000:2600], "test.txt": lines[2600:3200]}
    for name, part in parts.items():
        (tmp_path / name).write_text("".join(part), encoding="utf-8")
    corpus = load_corpus(tmp_path)
    vocab = corpus.vocab
    train_words = {w for line in parts["train.txt"] for w in line.split()}
    assert set(vocab.words) == train_words | {EOS, UNK}  # WikiText's own <unk> is a train word
    assert (corpus.train == vocab.index[EOS]).sum().item() == len(parts["train.txt"])  # one <eos> per line
    valid_words = [w for line in parts["valid.txt"] for w in [*line.split(), EOS]]
    unseen = [w for w in valid_words if w not in vocab.index]
    assert unseen, "the slice should have valid words absent from train"
    assert corpus.valid.tolist() == [vocab.index.get(w, vocab.index[UNK]) for w in valid_words]
    assert 0 < corpus.unknown_rate["valid"] < 0.5


@pytest.mark.parametrize("model", ["LSTM", "GRU", "Transformer"])
def test_a_batch_of_requests_samples_each_as_if_alone(model):
    from training.jobs.lm.wordlm import build_language_model, generate_batch

    torch.manual_seed(0)
    vocab = [f"w{i}" for i in range(40)] + ["<unk>", "<eos>"]
    lm = build_language_model(model, len(vocab), 16, nhid=16, nlayers=2, nhead=2, dropout=0.0, tied=False).eval()
    requests = [
        {"prompt": "w1 w2 w3", "n_words": 12, "temperature": 1.0, "seed": 1},
        {"prompt": "", "n_words": 3, "temperature": 0.7, "seed": 2},
        {"prompt": "w5 unseen w6 w7 w8 w9 w10", "n_words": 20, "temperature": 1.5, "seed": 3},
        {"prompt": "w4", "n_words": 1, "temperature": 0.2, "seed": 4},
    ]
    together = generate_batch(lm, vocab, requests, window=8)
    for request, answer in zip(requests, together, strict=True):
        assert generate_batch(lm, vocab, [request], window=8) == [answer]
        assert answer["words"] == request["n_words"]
    assert together[2]["unknown_words"] == ["unseen"]


def test_runs_of_the_same_seed_get_names_of_their_own_and_say_who_started_them(corpus_dir, tmp_path, client):
    """MLflow drew generated names from `random` after the trainer seeded it: same seed, same name."""
    for _ in range(2):
        run_cli("train", "lm", corpus_dir, "--epochs", "1", *TINY, "--seed", "7", "--out-dir", tmp_path,
                "--experiment", "test-lm-names")  # fmt: skip
    experiment = client.get_experiment_by_name("test-lm-names").experiment_id
    runs = client.search_runs([experiment])
    names = [run.info.run_name for run in runs]
    assert len(runs) == 2 and len(set(names)) == 2, names
    assert {run.data.tags["mlflow.user"] for run in runs} == {getpass.getuser()}
