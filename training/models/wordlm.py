"""Word-level language models as in PyTorch's word_language_model example, and sampling from them.

This file imports only torch, so the TorchServe handler can ship it inside a .mar as it is.
Both model kinds share one call: `model(tokens (T, B), hidden) -> (logits (T*B, V), hidden)`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

MODEL_TYPES = ("RNN_TANH", "RNN_RELU", "LSTM", "GRU", "Transformer")
EOS = "<eos>"


class RNNModel(nn.Module):
    """Embedding -> RNN/LSTM/GRU -> linear decoder, with dropout and optional weight tying."""

    def __init__(self, model: str, ntokens: int, emsize: int, nhid: int, nlayers: int, dropout: float, tied: bool):
        super().__init__()
        self.model_type, self.nhid, self.nlayers = model, nhid, nlayers
        self.drop = nn.Dropout(dropout)
        self.encoder = nn.Embedding(ntokens, emsize)
        if model in ("LSTM", "GRU"):
            self.rnn = getattr(nn, model)(emsize, nhid, nlayers, dropout=dropout if nlayers > 1 else 0.0)
        else:
            nonlinearity = {"RNN_TANH": "tanh", "RNN_RELU": "relu"}[model]
            self.rnn = nn.RNN(emsize, nhid, nlayers, nonlinearity=nonlinearity, dropout=dropout if nlayers > 1 else 0.0)
        self.decoder = nn.Linear(nhid, ntokens)
        if tied:
            if nhid != emsize:
                raise ValueError(f"--tied needs --nhid equal to --emsize (got {nhid} and {emsize})")
            self.decoder.weight = self.encoder.weight
        nn.init.uniform_(self.encoder.weight, -0.1, 0.1)
        nn.init.zeros_(self.decoder.bias)
        if not tied:
            nn.init.uniform_(self.decoder.weight, -0.1, 0.1)

    def init_hidden(self, batch_size: int):
        weight = next(self.parameters())
        zeros = weight.new_zeros(self.nlayers, batch_size, self.nhid)
        return (zeros, zeros.clone()) if self.model_type == "LSTM" else zeros

    def forward(self, tokens: torch.Tensor, hidden=None):
        if hidden is None:
            hidden = self.init_hidden(tokens.size(1))
        output, hidden = self.rnn(self.drop(self.encoder(tokens)), hidden)
        return self.decoder(self.drop(output)).view(-1, self.decoder.out_features), hidden


class PositionalEncoding(nn.Module):
    def __init__(self, d_model: int, dropout: float, max_len: int = 5000):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        position = torch.arange(max_len).unsqueeze(1)
        div_term = torch.exp(torch.arange(0, d_model, 2) * (-math.log(10000.0) / d_model))
        pe = torch.zeros(max_len, 1, d_model)
        pe[:, 0, 0::2] = torch.sin(position * div_term)
        pe[:, 0, 1::2] = torch.cos(position * div_term[: d_model // 2])
        self.register_buffer("pe", pe, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(x + self.pe[: x.size(0)])


class TransformerModel(nn.Module):
    """A causal Transformer encoder over word embeddings (the example's TransformerModel)."""

    model_type = "Transformer"

    def __init__(self, ntokens: int, emsize: int, nhead: int, nhid: int, nlayers: int, dropout: float, tied: bool):
        super().__init__()
        if emsize % nhead:
            raise ValueError(f"--emsize {emsize} must be divisible by --nhead {nhead}")
        self.emsize = emsize
        self.encoder = nn.Embedding(ntokens, emsize)
        self.pos_encoder = PositionalEncoding(emsize, dropout)
        layer = nn.TransformerEncoderLayer(emsize, nhead, nhid, dropout)
        self.transformer = nn.TransformerEncoder(layer, nlayers, enable_nested_tensor=False)
        self.decoder = nn.Linear(emsize, ntokens)
        if tied:
            self.decoder.weight = self.encoder.weight
        nn.init.uniform_(self.encoder.weight, -0.1, 0.1)
        nn.init.zeros_(self.decoder.bias)
        if not tied:
            nn.init.uniform_(self.decoder.weight, -0.1, 0.1)

    def init_hidden(self, batch_size: int) -> None:
        return None

    def forward(self, tokens: torch.Tensor, hidden=None):
        mask = nn.Transformer.generate_square_subsequent_mask(tokens.size(0), device=tokens.device)
        x = self.pos_encoder(self.encoder(tokens) * math.sqrt(self.emsize))
        output = self.transformer(x, mask=mask, is_causal=True)
        return self.decoder(output).view(-1, self.decoder.out_features), None


def build_language_model(
    model: str, ntokens: int, emsize: int, nhid: int, nlayers: int, nhead: int, dropout: float, tied: bool
) -> nn.Module:
    if model == "Transformer":
        return TransformerModel(ntokens, emsize, nhead, nhid, nlayers, dropout, tied)
    if model not in MODEL_TYPES:
        raise ValueError(f"--model {model!r} is not one of {', '.join(MODEL_TYPES)}")
    return RNNModel(model, ntokens, emsize, nhid, nlayers, dropout, tied)


def detach_hidden(hidden):
    """Cut the graph between bptt windows (the example's repackage_hidden)."""
    if hidden is None:
        return None
    if isinstance(hidden, torch.Tensor):
        return hidden.detach()
    return tuple(detach_hidden(h) for h in hidden)


@torch.no_grad()
def sample_ids(
    model: nn.Module,
    prompt: list[int],
    n_words: int,
    temperature: float,
    generator: torch.Generator,
    window: int = 35,
) -> Iterator[int]:
    """Sample `n_words` word ids after `prompt` (a random word when empty).

    RNNs carry their hidden state word to word; the Transformer re-reads the last `window` words.
    Sampling draws from a CPU generator, so a seed gives the same words on any device.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    model.eval()
    device = next(model.parameters()).device
    vocab_size = model.decoder.out_features
    context = list(prompt) or [int(torch.randint(vocab_size, (1,), generator=generator))]
    recurrent = model.model_type != "Transformer"
    logits, hidden = model(torch.tensor(context[-window:], device=device).view(-1, 1))
    for _ in range(n_words):
        probs = F.softmax(logits[-1].float().cpu() / temperature, dim=-1)
        word = int(torch.multinomial(probs, 1, generator=generator))
        yield word
        context.append(word)
        if recurrent:
            logits, hidden = model(torch.tensor([[word]], device=device), hidden)
        else:
            logits, _ = model(torch.tensor(context[-window:], device=device).view(-1, 1))


def join_words(words: list[str]) -> str:
    """Text from words: `<eos>` ends a line."""
    lines, line = [], []
    for word in words:
        if word == EOS:
            lines.append(" ".join(line))
            line = []
        else:
            line.append(word)
    return "\n".join([*lines, " ".join(line)])


def lm_from_checkpoint(state: dict) -> nn.Module:
    """Rebuild the model of a `kind == "lm"` checkpoint, weights loaded, in eval mode."""
    model = build_language_model(**state["model_config"])
    model.load_state_dict(state["model"])
    return model.eval()


def generate_text(
    model: nn.Module,
    vocab: list[str],
    prompt: str,
    n_words: int,
    temperature: float,
    seed: int,
    window: int = 35,
    on_word: Callable[[int], None] | None = None,
) -> dict:
    """Continue `prompt` by `n_words` sampled words: {"text", "words", "unknown_words"}.

    Prompt words outside the vocabulary become `<unk>` and are listed in "unknown_words".
    `on_word(count)` is called after each sampled word (progress reporting).
    """
    index = {w: i for i, w in enumerate(vocab)}
    prompt_words = prompt.split()
    unknown = list(dict.fromkeys(w for w in prompt_words if w not in index))
    unk = index.get("<unk>", 0)
    prompt_ids = [index.get(w, unk) for w in prompt_words]
    generator = torch.Generator().manual_seed(seed)
    sampled = []
    for count, word in enumerate(sample_ids(model, prompt_ids, n_words, temperature, generator, window), 1):
        sampled.append(vocab[word])
        if on_word:
            on_word(count)
    return {"text": join_words(prompt_words + sampled), "words": len(sampled), "unknown_words": unknown}
