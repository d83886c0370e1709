"""The language-model job: corpus -> model -> bptt epochs -> MLflow/TensorBoard and checkpoints."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from training.checkpoint import load_checkpoint, restore_rng_state, rng_state, seed_everything
from training.data.text import batchify, load_corpus
from training.devices import choose_device
from training.loops.language import LMEpochResult, evaluate_lm, perplexity, train_lm_epoch
from training.models.summary import layer_table
from training.models.wordlm import build_language_model
from training.plots import LM_PANELS
from training.session import load_resume, training_session

RESUMABLE = {"epochs", "device", "log_interval", "out_dir"}
LR_ANNEAL = 4.0  # the example divides lr by 4 when validation loss does not improve


@dataclass
class LMConfig:
    data: str | None = None
    model: str = "LSTM"
    emsize: int = 200
    nhid: int = 200
    nlayers: int = 2
    nhead: int = 2
    dropout: float = 0.2
    tied: bool = False
    lr: float = 20.0
    clip: float = 0.25
    epochs: int = 40
    batch_size: int = 20
    eval_batch_size: int = 10
    bptt: int = 35
    amp: str = "off"
    compile: bool = False
    seed: int = 1111
    device: str = "auto"
    log_interval: int = 200
    dry_run: bool = False
    experiment: str = "wordlm-wikitext2"
    run_name: str | None = None
    registered_model: str = "wordlm-wikitext2"
    out_dir: str = "runs"

    def __post_init__(self) -> None:
        # checkpoints store this config and load with weights_only=True: plain strings, never Paths
        self.data = None if self.data is None else str(self.data)

    def model_config(self, ntokens: int) -> dict:
        return {
            "model": self.model, "ntokens": ntokens, "emsize": self.emsize, "nhid": self.nhid,
            "nlayers": self.nlayers, "nhead": self.nhead, "dropout": self.dropout, "tied": self.tied,
        }  # fmt: skip


@dataclass
class LMState:
    epoch: int = 0
    lr: float = 0.0
    global_step: int = 0
    best_val_loss: float = math.inf
    best_epoch: int = 0
    train_seconds: float = 0.0


def _ruler(char: str) -> str:
    return char * 89


def train_lm(config: LMConfig, resume: Path | None = None) -> Path:
    """Train (or resume) a word-level LM; return the run directory holding best.pt and last.pt."""
    saved = load_resume(resume, "lm")
    choice = choose_device(config.device)
    device = choice.device
    print(choice.describe(), flush=True)
    seed_everything(config.seed)

    corpus = load_corpus(config.data)
    ntokens = len(corpus.vocab)
    print(
        f"=> vocabulary {ntokens} words; {len(corpus.train)} train / {len(corpus.valid)} valid / "
        f"{len(corpus.test)} test tokens"
    )
    train_data = batchify(corpus.train, config.batch_size)
    val_data = batchify(corpus.valid, config.eval_batch_size)
    test_data = batchify(corpus.test, config.eval_batch_size)

    model_config = config.model_config(ntokens)
    model = build_language_model(**model_config).to(device)
    # fused: one kernel per step for all parameters (CPU and CUDA)
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, fused=device.type in ("cpu", "cuda"))
    state = LMState(lr=config.lr)
    if saved:
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        restore_rng_state(saved["rng"])
        state = LMState(**saved["train_state"])

    tags = {
        "dataset": str(Path(config.data).resolve()),
        "vocab_size": ntokens,
        "train_tokens": len(corpus.train),
        "valid_tokens": len(corpus.valid),
        "test_tokens": len(corpus.test),
        "valid_unknown_rate": f"{corpus.unknown_rate['valid']:.4f}",
    }
    with training_session(config, "lm", saved, resume, choice, tags) as session:
        run = session.run
        if saved:
            session.catch_up(saved, "val/loss")
        else:
            example = train_data[: config.bptt, :1].to(device)
            run.log_text(layer_table(model, example), "model_summary.txt")
        # a replayed epoch (after a crash) must not log its interval steps twice
        logged = run.logged_steps("train/loss") if saved else set()

        def log_interval(step: int, loss: float) -> None:
            if step not in logged:
                run.log_metrics({"train/loss": loss, "train/ppl": perplexity(loss)}, step=step)

        trained = torch.compile(model) if config.compile else model
        for epoch in range(state.epoch + 1, config.epochs + 1):
            for group in optimizer.param_groups:
                group["lr"] = state.lr
            train = train_lm_epoch(
                trained, train_data, optimizer, device, config.amp, epoch, config.bptt, config.clip,
                config.log_interval, state.global_step, log_interval, config.dry_run,
            )  # fmt: skip
            val = evaluate_lm(model, val_data, device, config.amp, config.bptt)
            seconds = train.seconds + val.seconds
            print(_ruler("-"))
            print(
                f"| end of epoch {epoch:3d} | time: {seconds:5.2f}s | valid loss {val.loss:5.2f} | "
                f"valid ppl {val.ppl:8.2f}"
            )
            print(_ruler("-"), flush=True)
            metrics = _epoch_metrics(train, val, state.lr, seconds)
            improved = val.loss < state.best_val_loss
            state.epoch, state.global_step = epoch, state.global_step + train.batches
            state.train_seconds += seconds
            if improved:
                state.best_val_loss, state.best_epoch = val.loss, epoch
            else:
                state.lr /= LR_ANNEAL
            session.save_epoch(
                {
                    "kind": "lm",
                    "format_version": 1,
                    "epoch": epoch,
                    "model": model.state_dict(),
                    "model_config": model_config,
                    "vocab": corpus.vocab.words,
                    "optimizer": optimizer.state_dict(),
                    "train_state": asdict(state),
                    "metrics": metrics,
                    "rng": rng_state(),
                    "config": asdict(config),
                    "experiment": config.experiment,
                },
                improved,
            )
            run.log_metrics(metrics, step=epoch)
            run.sync_tensorboard()

        model.load_state_dict(load_checkpoint(session.best, kind="lm")["model"])
        test = evaluate_lm(model, test_data, device, config.amp, config.bptt)
        print(_ruler("="))
        print(f"| End of training | test loss {test.loss:5.2f} | test ppl {test.ppl:8.2f}")
        print(_ruler("="), flush=True)
        run.log_metrics(
            {
                "test/loss": test.loss,
                "test/ppl": test.ppl,
                "best/val_loss": state.best_val_loss,
                "best/epoch": state.best_epoch,
                "time/total_seconds": state.train_seconds,
            },
            step=state.epoch,
        )
        run.set_tags({"stop_reason": f"completed {config.epochs} epochs"})
        session.publish(
            config.registered_model,
            {"val_ppl": f"{perplexity(state.best_val_loss):.2f}", "test_ppl": f"{test.ppl:.2f}",
             "epoch": str(state.best_epoch)},
            LM_PANELS,
        )  # fmt: skip
    return session.run_dir


def _epoch_metrics(train: LMEpochResult, val: LMEpochResult, lr: float, seconds: float) -> dict[str, float]:
    return {
        "train/epoch_loss": train.loss,
        "val/loss": val.loss,
        "val/ppl": val.ppl,
        "lr": lr,
        "time/epoch_seconds": seconds,
        "time/tokens_per_second": train.tokens_per_second,
    }
