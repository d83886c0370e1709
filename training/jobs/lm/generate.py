"""Generate text from a language-model checkpoint (UTF-8 on every platform, logged to its run); evaluate one."""

from __future__ import annotations

import time
from pathlib import Path

from serving.handlers.request_fields import MIN_TEMPERATURE
from training import tracking
from training.devices import choose_device
from training.jobs.evaluate import EvaluateOptions, evaluation_run
from training.jobs.lm import PPL, LMConfig
from training.jobs.lm.corpus import batchify, load_corpus
from training.jobs.lm.loop import evaluate_lm
from training.jobs.lm.wordlm import generate_text, lm_from_checkpoint
from training.metrics import VAL_LOSS, eval_metric_name
from training.tracking import registry


def generate(
    checkpoint: str | Path,
    *,
    prompt: str = "",
    words: int = 1000,
    temperature: float = 1.0,
    seed: int = 1111,
    outf: Path = Path("generated.txt"),
    log_interval: int = 100,
    device: str = "cpu",
) -> dict:
    """Sample `words` words after `prompt`, write them to `outf`, log them to the checkpoint's run."""
    if not temperature >= MIN_TEMPERATURE:  # NaN too
        raise ValueError(f"--temperature must be >= {MIN_TEMPERATURE}, got {temperature}")
    state, _ = registry.load_source(checkpoint, kind="lm")  # always loads onto the CPU first
    choice = choose_device(device)
    model = lm_from_checkpoint(state).to(choice.device)

    def progress(count: int) -> None:
        if log_interval and count % log_interval == 0:
            print(f"| Generated {count}/{words} words", flush=True)

    result = generate_text(
        model,
        state["vocab"],
        prompt,
        n_words=words,
        temperature=temperature,
        seed=seed,
        window=state["window"],
        on_word=progress,
    )
    if result["unknown_words"]:
        print(f"warning: prompt words not in the vocabulary, read as <unk>: {', '.join(result['unknown_words'])}")
    outf.parent.mkdir(parents=True, exist_ok=True)
    # Explicit UTF-8: the platform's default encoding (e.g. gbk) cannot hold every WikiText word.
    outf.write_text(result["text"] + "\n", encoding="utf-8", newline="\n")
    print(f"=> wrote {result['words']} words to {outf}")

    run_id = state.get("run_id")
    name = f"generated/seed{seed}-t{temperature:g}-{time.strftime('%Y%m%d-%H%M%S')}.txt"
    if run_id and tracking.log_text_to_run(run_id, result["text"], name):
        print(f"=> logged to MLflow run {run_id} as {name}")
    return result


SPLITS = {"val": "valid", "valid": "valid", "test": "test", "train": "train"}


def evaluate_checkpoint(state: dict, source: str, data: Path, options: EvaluateOptions) -> float:
    """`dlops evaluate` of a language model: loss and perplexity of checkpoint `state` on a split of the
    corpus at DATA (val or valid, test, train), its words read with the checkpoint's vocabulary; an
    MLflow run under the training run. Returns the perplexity."""
    if options.split not in SPLITS:
        raise ValueError(f"--split {options.split!r}: a language model is evaluated on one of {', '.join(SPLITS)}")
    split = SPLITS[options.split]
    corpus = load_corpus(data, vocab=state["vocab"])
    choice = choose_device(options.device)
    print(choice.describe(), flush=True)
    model = lm_from_checkpoint(state).to(choice.device)
    tokens = getattr(corpus, split)[: options.limit] if options.limit else getattr(corpus, split)
    result = evaluate_lm(model, batchify(tokens, options.batch_size).to(choice.device), choice.device, options.amp,
                         state["window"])  # fmt: skip
    print(f"=> {split}: loss {result.loss:.4f}, perplexity {result.ppl:.2f} over {len(tokens)} tokens")
    with evaluation_run(state, source=source, data=data, split=split, device_name=choice.name,
                        experiment=LMConfig.experiment) as run:  # fmt: skip
        run.log_params({"tokens": len(tokens)})
        run.log_metrics({eval_metric_name(VAL_LOSS.name): result.loss, eval_metric_name(PPL.name): result.ppl},
                        step=0)  # fmt: skip
    return result.ppl
