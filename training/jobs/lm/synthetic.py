"""A learnable, WikiText-like corpus on disk: what the tests, the demo and `dlops data synth-corpus`
train the language model on when no corpus is given."""

from __future__ import annotations

import random
from pathlib import Path

NOUNS = ("cat", "river", "engine", "café", "city", "bird", "théâtre", "road", "garden", "ship")
ADJECTIVES = ("old", "quiet", "naïve", "large", "red", "früh", "small", "busy")
VERBS = ("crosses", "watches", "follows", "builds", "finds", "leaves")
PLACES = ("Zürich", "Köln", "São Paulo", "Kraków", "Reykjavík", "Ōsaka", "Dublin", "Lyon")
HELD_OUT_PLACES = ("Ångström", "Þingvellir")  # only in valid/test: read as <unk>


def _sentence(rng: random.Random, places: tuple[str, ...]) -> str:
    return (
        f"the {rng.choice(ADJECTIVES)} {rng.choice(NOUNS)} {rng.choice(VERBS)} the "
        f"{rng.choice(ADJECTIVES)} {rng.choice(NOUNS)} in {rng.choice(places)} ."
    )


def _corpus_lines(rng: random.Random, n_lines: int, places: tuple[str, ...]) -> list[str]:
    lines = []
    for i in range(n_lines):
        if i % 25 == 0:
            lines += ["", f" = {rng.choice(PLACES)} @-@ {rng.choice(NOUNS)} = ", ""]
        lines.append(" " + " ".join(_sentence(rng, places) for _ in range(rng.randint(1, 3))) + " ")
    return lines


def write_synthetic_corpus(
    out: Path | str, train_lines: int = 2000, valid_lines: int = 200, test_lines: int = 200, seed: int = 0
) -> Path:
    """Write train.txt, valid.txt and test.txt of a learnable, WikiText-like corpus under `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    sizes = {"train": train_lines, "valid": valid_lines, "test": test_lines}
    for split, n_lines in sizes.items():
        places = PLACES if split == "train" else PLACES + HELD_OUT_PLACES
        text = "\n".join(_corpus_lines(rng, n_lines, places)) + "\n"
        (out / f"{split}.txt").write_text(text, encoding="utf-8")
    return out
