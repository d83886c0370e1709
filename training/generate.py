"""Generate text from a language-model checkpoint: UTF-8 on every platform, logged to its run."""

from __future__ import annotations

import time
from pathlib import Path

from training import tracking
from training.devices import choose_device
from training.models.wordlm import generate_text, lm_from_checkpoint
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
    if temperature <= 0:
        raise ValueError(f"--temperature must be > 0, got {temperature}")
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
