"""A word-level corpus (WikiText-2 style): vocabulary from the train split, `<eos>` at each line end.

DATA holds train.txt, valid.txt, test.txt, or WikiText's wiki.train.tokens, wiki.valid.tokens,
wiki.test.tokens. Words of valid/test missing from the train vocabulary become `<unk>`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from training.data.errors import DatasetError

EOS, UNK = "<eos>", "<unk>"
SPLIT_FILES = {
    "train": ("train.txt", "wiki.train.tokens"),
    "valid": ("valid.txt", "wiki.valid.tokens"),
    "test": ("test.txt", "wiki.test.tokens"),
}


class Vocabulary:
    def __init__(self, words: Iterable[str] = ()):
        self.words: list[str] = []
        self.index: dict[str, int] = {}
        for word in words:
            self.add(word)

    def add(self, word: str) -> int:
        if word not in self.index:
            self.index[word] = len(self.words)
            self.words.append(word)
        return self.index[word]

    def __len__(self) -> int:
        return len(self.words)

    def encode(self, words: Iterable[str]) -> list[int]:
        """Word ids; words outside the vocabulary become `<unk>`."""
        unk = self.index[UNK]
        return [self.index.get(w, unk) for w in words]

    def unknown(self, words: Iterable[str]) -> list[str]:
        """The words (in order, once each) that `encode` would map to `<unk>`."""
        return list(dict.fromkeys(w for w in words if w not in self.index))


def tokenize_line(line: str) -> list[str]:
    return line.split() + [EOS]


def read_tokens(path: Path) -> list[str]:
    tokens: list[str] = []
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                where = f"byte {raw[e.start]:#04x} at column {e.start + 1}"
                message = f"{path}:{lineno}: not UTF-8 text ({where}); a corpus must be UTF-8, as WikiText is"
                raise DatasetError(message) from e
            tokens += tokenize_line(line)
    if all(t == EOS for t in tokens):
        raise DatasetError(f"{path}: holds no words (an empty split)")
    return tokens


def split_path(root: Path, split: str) -> Path:
    for name in SPLIT_FILES[split]:
        if (root / name).is_file():
            return root / name
    names = " or ".join(SPLIT_FILES[split])
    raise DatasetError(f"{root}: the {split} split is missing (expected {names})")


def sample_prompts(path: Path, count: int, *, seed: int = 0, words: tuple[int, int] = (3, 12)) -> list[str]:
    """`count` prompts as users write them: runs of `words` (at least, at most) consecutive words of a
    text file's lines (WikiText's `= headings =` and empty lines left out), drawn with `seed`."""
    import random

    lines = [line.split() for line in Path(path).read_text(encoding="utf-8", errors="replace").splitlines()]
    lines = [line for line in lines if len(line) >= words[0] and not line[0].startswith("=")]
    if not lines:
        raise DatasetError(f"{path}: no line of {words[0]} words or more to draw prompts from")
    draw = random.Random(seed)
    prompts = []
    for _ in range(count):
        line = draw.choice(lines)
        length = draw.randint(words[0], min(words[1], len(line)))
        start = draw.randint(0, len(line) - length)
        prompts.append(" ".join(line[start : start + length]))
    return prompts


@dataclass(kw_only=True)
class Corpus:
    vocab: Vocabulary
    train: torch.Tensor
    valid: torch.Tensor
    test: torch.Tensor
    unknown_rate: dict[str, float]  # share of valid/test tokens mapped to <unk> (new words only)


def load_corpus(root: Path | str, vocab: list[str] | None = None) -> Corpus:
    """The three splits as word ids of the training split's vocabulary, or of `vocab` (a trained model's)."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: corpus folder does not exist")
    paths = {split: split_path(root, split) for split in SPLIT_FILES}
    train_tokens = read_tokens(paths["train"])
    words = Vocabulary(train_tokens if vocab is None else vocab)
    words.add(UNK)  # WikiText has <unk> already; other corpora need it for unseen words
    splits = {"train": torch.tensor(words.encode(train_tokens), dtype=torch.long)}
    unknown_rate = {}
    for split in ("valid", "test"):
        tokens = read_tokens(paths[split])
        unknown_rate[split] = sum(t not in words.index for t in tokens) / len(tokens)
        splits[split] = torch.tensor(words.encode(tokens), dtype=torch.long)
    return Corpus(
        vocab=words, train=splits["train"], valid=splits["valid"], test=splits["test"], unknown_rate=unknown_rate
    )


def batchify(data: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Cut the token stream into `batch_size` columns (dropping the remainder): shape (T, batch)."""
    steps = data.size(0) // batch_size
    if steps < 2:
        raise DatasetError(f"a split of {data.size(0)} tokens is too short for batch size {batch_size}")
    return data[: steps * batch_size].view(batch_size, steps).t().contiguous()


def get_batch(source: torch.Tensor, i: int, bptt: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs rows i..i+bptt and the next-word targets, flattened."""
    length = min(bptt, len(source) - 1 - i)
    return source[i : i + length], source[i + 1 : i + 1 + length].reshape(-1)
