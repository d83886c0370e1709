"""The language-model job: a WikiText-style corpus -> RNN/LSTM/GRU/Transformer -> perplexity.

As in PyTorch's word_language_model example: truncated BPTT, plain SGD whose learning rate is
divided by 4 when validation loss does not improve, the best model by validation loss evaluated
on the test split, and the example's console lines.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import torch
from torch import nn

from training.checkpoint import load_checkpoint
from training.jobs.config import RunConfig
from training.jobs.evaluate import EvaluateOptions
from training.jobs.lm.commands import COMMANDS, DATA_COMMANDS, SERVED_AS
from training.jobs.lm.corpus import EOS, UNK, batchify, load_corpus, sample_prompts, split_path
from training.jobs.lm.loop import LMStep, evaluate_lm, perplexity, train_lm_epoch
from training.jobs.lm.wordlm import MODEL_TYPES, build_language_model, generate_batch, lm_from_checkpoint
from training.jobs.run import EpochContext, JobRun, Optimization
from training.jobs.serving import HANDLERS as HANDLERS
from training.jobs.serving import Monitoring, Serving
from training.jobs.serving import Request as Request
from training.jobs.spec import Column, EpochTable, JobSpec, ReportSpec
from training.metrics import EPOCH_SECONDS, TRAIN_LOSS, VAL_LOSS, Metric
from training.options import option

HERE = Path(__file__).resolve().parent  # the handler and the model file a served model ships
LR_ANNEAL = 4.0  # the example divides lr by 4 when validation loss does not improve
RULER = 89


@dataclass(frozen=True, kw_only=True)
class LMConfig(RunConfig):
    model: str = option("LSTM", type=click.Choice(MODEL_TYPES))
    emsize: int = option(200, type=click.IntRange(1), help="word embedding size")
    nhid: int = option(
        200, type=click.IntRange(1), help="hidden units per layer (feed-forward size for the Transformer)"
    )
    nlayers: int = option(2, type=click.IntRange(1))
    nhead: int = option(2, type=click.IntRange(1), help="attention heads (Transformer)")
    dropout: float = option(0.2, type=click.FloatRange(0, 1, max_open=True))
    tied: bool = option(False, is_flag=True, help="tie the word embedding and softmax weights")
    lr: float = option(20.0, type=click.FloatRange(0, min_open=True))
    clip: float = option(0.25, type=click.FloatRange(0), help="gradient clipping")
    epochs: int = option(40, type=click.IntRange(1), resumable=True)
    batch_size: int = option(20, type=click.IntRange(1))
    eval_batch_size: int = option(10, type=click.IntRange(1))
    bptt: int = option(35, type=click.IntRange(1), help="sequence length")
    seed: int = option(1111, type=int)
    log_interval: int = option(200, type=click.IntRange(1), resumable=True)
    dry_run: bool = option(False, is_flag=True, help="one batch per epoch, to check the pipeline")
    experiment: str = option("wordlm-wikitext2")
    registered_model: str = option("wordlm-wikitext2")


def ruler(char: str) -> str:
    return char * RULER


def read_v1(state: dict[str, Any]) -> tuple[dict, float, dict, dict]:
    """A version-1 LM checkpoint: val loss as the best value, the annealed lr and step as job state."""
    old = state["train_state"]
    job_state = {"lr": old["lr"], "global_step": old["global_step"]}
    return state["model_config"], old["best_val_loss"], job_state, {"window": state["config"]["bptt"],
                                                                     "scheduler": None, "scaler": {}}  # fmt: skip


PPL = Metric(name="val/ppl", label="val perplexity", higher_is_better=False, log_scale=True)
TRAIN_PPL, EPOCH_LOSS = "train/ppl", "train/epoch_loss"
TEST_LOSS, TEST_PPL = "test/loss", "test/ppl"
TOKENS_PER_SECOND = "time/tokens_per_second"
SAMPLES = "generated"  # the run's artifact folder of generated texts (`dlops generate`)


def describe_model(params: dict[str, str]) -> str:
    return f"{params.get('model')} {params.get('nlayers')}x{params.get('nhid')} (emsize {params.get('emsize')})"


class LMRun(JobRun):
    """One run of the language model: the corpus batched on the device, truncated BPTT, annealed SGD."""

    config: LMConfig

    def build_data(self) -> dict[str, Any]:
        c = self.config
        corpus = load_corpus(c.data)
        self.vocab = corpus.vocab.words
        print(f"=> vocabulary {len(self.vocab)} words; {len(corpus.train)} train / {len(corpus.valid)} valid / "
              f"{len(corpus.test)} test tokens")  # fmt: skip
        # The whole corpus moves to the device once (WikiText-2 is ~16 MB as int64): no copy per window.
        self.window = c.bptt  # what serving needs (the spec's inference keys): the vocabulary and the window
        self.train_data = batchify(corpus.train, c.batch_size).to(self.device)
        self.val_data = batchify(corpus.valid, c.eval_batch_size).to(self.device)
        self.test_data = batchify(corpus.test, c.eval_batch_size).to(self.device)
        self.lr, self.global_step = c.lr, 0
        return {
            "dataset": str(Path(c.data).resolve()),
            "vocab_size": len(self.vocab),
            "train_tokens": len(corpus.train),
            "valid_tokens": len(corpus.valid),
            "test_tokens": len(corpus.test),
            "valid_unknown_rate": f"{corpus.unknown_rate['valid']:.4f}",
        }

    def model_config(self) -> dict[str, Any]:
        c = self.config
        return {"model": c.model, "ntokens": len(self.vocab), "emsize": c.emsize, "nhid": c.nhid,
                "nlayers": c.nlayers, "nhead": c.nhead, "dropout": c.dropout, "tied": c.tied}  # fmt: skip

    def check_warm_start(self, source: dict[str, Any]) -> None:
        if source["vocab"] != self.vocab:
            raise ValueError("--init-from: the checkpoint was trained on another vocabulary; its word ids would "
                             "mean other words here")  # fmt: skip
        if source["model_config"] != self.model_config():
            raise ValueError(f"--init-from: the checkpoint's model {source['model_config']} differs from this run's "
                             f"{self.model_config()}")  # fmt: skip

    def example_input(self) -> torch.Tensor:
        return self.train_data[: self.config.bptt, :1]

    def build_optimization(self, model: nn.Module, steps_per_epoch: int) -> Optimization:
        # fused: one kernel per step for all parameters (CPU and CUDA)
        sgd = torch.optim.SGD(model.parameters(), lr=self.config.lr, fused=self.device.type in ("cpu", "cuda"))
        return Optimization(optimizer=sgd)

    def before_epoch(self, epoch: int, optimization: Optimization) -> None:
        for group in optimization.optimizer.param_groups:
            group["lr"] = self.lr

    def train_epoch(self, model: nn.Module, context: EpochContext) -> dict[str, float]:
        c = self.config

        def log_interval(step: int, loss: float) -> None:
            context.log_step({TRAIN_LOSS: loss, TRAIN_PPL: perplexity(loss)}, step)

        step = LMStep(
            model=model,
            optimizer=context.optimization.optimizer,
            device=self.device,
            bptt=c.bptt,
            clip=c.clip,
            amp=c.amp,
            scaler=context.scaler,
        )
        train = train_lm_epoch(step, self.train_data, epoch=context.epoch, log_interval=c.log_interval,
                               first_step=self.global_step, on_interval=log_interval, dry_run=c.dry_run,
                               drop_last=c.compile, control=context.control, resume=context.resume)  # fmt: skip
        if train.stopped_at is None:  # a stopped epoch's steps are counted when it is resumed and finished
            self.global_step += train.batches
        return {EPOCH_LOSS: train.loss, TOKENS_PER_SECOND: train.tokens_per_second}

    def evaluate(self, model: nn.Module, reduce) -> dict[str, float]:
        # fp32 whatever the training precision: perplexities compare across devices and precisions,
        # and a reloaded checkpoint reproduces them exactly
        val = evaluate_lm(model, self.val_data, self.device, "off", self.config.bptt)
        return {VAL_LOSS.name: val.loss, PPL.name: val.ppl}

    def after_epoch(self, *, improved: bool) -> None:
        if not improved:
            self.lr /= LR_ANNEAL

    def epoch_line(self, epoch: int, metrics: dict[str, float]) -> str:
        return (
            f"{ruler('-')}\n| end of epoch {epoch:3d} | time: {metrics[EPOCH_SECONDS]:5.2f}s | "
            f"valid loss {metrics[VAL_LOSS.name]:5.2f} | valid ppl {metrics[PPL.name]:8.2f}\n{ruler('-')}"
        )

    def finish(self, model: nn.Module, best: Path) -> dict[str, float]:
        model.load_state_dict(load_checkpoint(best, kind="lm")["model"])
        test = evaluate_lm(model, self.test_data, self.device, "off", self.config.bptt)
        print(f"{ruler('=')}\n| End of training | test loss {test.loss:5.2f} | test ppl {test.ppl:8.2f}\n{ruler('=')}")
        return {TEST_LOSS: test.loss, TEST_PPL: test.ppl}

    def registry_tags(self, best_value: float, best_epoch: int, final: dict[str, float]) -> dict[str, str]:
        return {"val_ppl": f"{perplexity(best_value):.2f}", "test_ppl": f"{final[TEST_PPL]:.2f}",
                "epoch": str(best_epoch)}  # fmt: skip

    def state_dict(self) -> dict[str, Any]:
        return {"lr": self.lr, "global_step": self.global_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.lr, self.global_step = state["lr"], state["global_step"]


# --- serving: the adapter between a request and an answer ----------------------------------------------


def example_request(meta: dict[str, Any]) -> dict[str, Any]:
    """A prompt of the vocabulary's first three words, eight words sampled with seed 0."""
    words = [w for w in meta["vocab"] if w not in (EOS, UNK)][:3]
    return {"prompt": " ".join(words), "max_words": 8, "temperature": 1.0, "seed": 0}


def reference_requests(state: dict[str, Any], count: int) -> list[dict[str, Any]]:
    """Prompts drawn from the validation split, one generated word each (the summary is the prompt's)."""
    data = state["config"].get("data")
    if not data:
        raise ValueError("the run had no DATA folder")
    prompts = sample_prompts(split_path(Path(data), "valid"), count)
    return [{"prompt": prompt, "max_words": 1, "seed": 0} for prompt in prompts]


def offline_answer(state: dict[str, Any], request: dict[str, Any], amp: str = "off") -> dict[str, Any]:
    """The text `dlops generate` writes for the same prompt and seed (generation runs in fp32)."""
    settings = {"prompt": request.get("prompt", ""), "n_words": request["max_words"],
                "temperature": request.get("temperature", 1.0), "seed": request["seed"]}  # fmt: skip
    return generate_batch(lm_from_checkpoint(state), state["vocab"], [settings], state["window"])[0]


def evaluate_checkpoint(spec: JobSpec, state: dict[str, Any], source: str, data: Path,
                        options: EvaluateOptions) -> None:  # fmt: skip
    from training.jobs.lm.generate import evaluate_checkpoint as evaluate_lm_checkpoint

    evaluate_lm_checkpoint(state, source, data, options)


SPEC = JobSpec(
    kind="lm",
    description="A word-level language model on DATA (train.txt/valid.txt/test.txt or wiki.*.tokens).",
    config=LMConfig,
    run=LMRun,
    build_model=build_language_model,
    data_hint="a folder with train.txt, valid.txt and test.txt",
    metrics=(PPL,),
    best=VAL_LOSS,  # as the example: the model kept for test
    sweep=PPL,  # what people compare LMs by
    panels={"loss": [EPOCH_LOSS, VAL_LOSS.name], "perplexity": [PPL.name]},
    report=ReportSpec(
        columns=(
            Column(label="best val ppl", metric=PPL.name, summary="min"),
            Column(label="test ppl", metric=TEST_PPL),
        ),
        throughput=Column(label="throughput", metric=TOKENS_PER_SECOND, summary="mean", digits=0, unit="tokens/s"),
        train_loss=EPOCH_LOSS,
        quality=PPL,
        epoch_table=EpochTable(
            title="Language models", metric=PPL, final=Column(label="test", metric=TEST_PPL), samples=SAMPLES
        ),
    ),  # fmt: skip
    serving=Serving(
        name=SERVED_AS,
        handler=HERE / "text_generator.py",
        handler_class="TextGenerator",
        model_file=HERE / "wordlm.py",
        inference_keys=("vocab", "window"),
        input="text",
        request_field="prompt",
        example_request=example_request,
        offline_answer=offline_answer,
        answer_mismatch=lambda served, offline, amp: None if served == offline else f"served {served!r}",
        # a request's time grows with the words it asks for, so one window's p99 varies more than a classifier's
        canary={"max_p99_ratio": 3.0},
        # prompts in another language or of another field raise the unknown-word share first
        monitoring=Monitoring(
            reference_requests=reference_requests, numeric=("prompt_words", "unknown_share", "mean_word_length")
        ),
    ),  # fmt: skip
    commands=tuple(COMMANDS),
    data_commands=tuple(DATA_COMMANDS),
    describe_model=describe_model,
    evaluate=evaluate_checkpoint,
    upgrade_v1=read_v1,
    step_metrics=(TRAIN_LOSS, TRAIN_PPL),
)
