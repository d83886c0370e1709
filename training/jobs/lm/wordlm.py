"""Word-level language models as in PyTorch's word_language_model example, and sampling from them.

This file imports only torch, so the TorchServe handler can ship it inside a .mar as it is.
Both model kinds share one call: `model(tokens (T, B), hidden) -> (logits (T*B, V), hidden)`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

MODEL_TYPES = ("RNN_TANH", "RNN_RELU", "LSTM", "GRU", "Transformer")
EOS = "<eos>"


class RNNModel(nn.Module):
    """Embedding -> RNN/LSTM/GRU -> linear decoder, with dropout and optional weight tying."""

    def __init__(self, model: str, ntokens: int, emsize: int, *, nhid: int, nlayers: int, dropout: float, tied: bool):
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

    def __init__(self, ntokens: int, emsize: int, nhead: int, *, nhid: int, nlayers: int, dropout: float, tied: bool):
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
    model: str, ntokens: int, emsize: int, *, nhid: int, nlayers: int, nhead: int, dropout: float, tied: bool
) -> nn.Module:
    if model == "Transformer":
        return TransformerModel(ntokens, emsize, nhead, nhid=nhid, nlayers=nlayers, dropout=dropout, tied=tied)
    if model not in MODEL_TYPES:
        raise ValueError(f"--model {model!r} is not one of {', '.join(MODEL_TYPES)}")
    return RNNModel(model, ntokens, emsize, nhid=nhid, nlayers=nlayers, dropout=dropout, tied=tied)


def detach_hidden(hidden):
    """Cut the graph between bptt windows (the example's repackage_hidden)."""
    if hidden is None:
        return None
    if isinstance(hidden, torch.Tensor):
        return hidden.detach()
    return tuple(detach_hidden(h) for h in hidden)


@dataclass(kw_only=True)
class Stream:
    """One request of a generation batch: its context so far, its own sampler and its own settings."""

    context: list[int]
    n_words: int
    temperature: float
    generator: torch.Generator
    sampled: list[int] = field(default_factory=list)
    logits: torch.Tensor | None = None  # the distribution over the next word (1-D)
    hidden: object = None  # RNNs: the state after the last word

    @property
    def done(self) -> bool:
        return len(self.sampled) >= self.n_words

    def sample(self) -> int:
        """Draw the next word from this stream's own generator: its text never depends on its neighbours."""
        probs = F.softmax(self.logits.float().cpu() / self.temperature, dim=-1)
        word = int(torch.multinomial(probs, 1, generator=self.generator))
        self.sampled.append(word)
        self.context.append(word)
        return word


def _stack_hidden(hiddens: list):
    if isinstance(hiddens[0], tuple):  # LSTM: (h, c)
        return tuple(torch.cat(parts, dim=1) for parts in zip(*hiddens, strict=True))
    return torch.cat(hiddens, dim=1)


def _split_hidden(hidden, n: int) -> list:
    if isinstance(hidden, tuple):
        return [tuple(part[:, i : i + 1] for part in hidden) for i in range(n)]
    return [hidden[:, i : i + 1] for i in range(n)]


@torch.no_grad()
def sample_streams(model: nn.Module, streams: list[Stream], window: int = 35, on_step=None) -> None:
    """Extend every stream by its own n_words, one forward pass per step for all streams still going.

    RNNs read each prompt once, then step all streams together, one word each, carrying their
    hidden states side by side. The Transformer re-reads each stream's last `window` words, the
    windows right-padded into one batch: causal attention keeps a word from seeing the padding
    after it. Sampling draws from each stream's CPU generator, so a seed gives the same words on
    any device and in any batch.
    """
    model.eval()
    device = next(model.parameters()).device
    recurrent = model.model_type != "Transformer"
    if recurrent:
        for stream in streams:  # prompts differ in length: one pass each, then side by side
            logits, stream.hidden = model(torch.tensor(stream.context[-window:], device=device).view(-1, 1))
            stream.logits = logits[-1]
    else:
        _transformer_step(model, streams, window, device)
    step = 0
    while active := [s for s in streams if not s.done]:
        for stream in active:
            stream.sample()
        step += 1
        if on_step:
            on_step(step)
        active = [s for s in active if not s.done]
        if not active:
            break
        if recurrent:
            tokens = torch.tensor([[s.context[-1] for s in active]], device=device)
            logits, hidden = model(tokens, _stack_hidden([s.hidden for s in active]))
            for stream, row, state in zip(active, logits, _split_hidden(hidden, len(active)), strict=True):
                stream.logits, stream.hidden = row, state
        else:
            _transformer_step(model, active, window, device)


def _transformer_step(model: nn.Module, streams: list[Stream], window: int, device: torch.device) -> None:
    windows = [s.context[-window:] for s in streams]
    longest = max(len(w) for w in windows)
    tokens = torch.zeros(longest, len(streams), dtype=torch.long)
    for i, words in enumerate(windows):
        tokens[: len(words), i] = torch.tensor(words)
    logits, _ = model(tokens.to(device))
    logits = logits.view(longest, len(streams), -1)
    for i, (stream, words) in enumerate(zip(streams, windows, strict=True)):
        stream.logits = logits[len(words) - 1, i]


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


def generate_batch(model: nn.Module, vocab: list[str], requests: list[dict], window: int = 35,
                   on_step: Callable[[int], None] | None = None) -> list[dict]:  # fmt: skip
    """Continue each request's prompt by its own number of sampled words, all in one batch.

    A request is {"prompt", "n_words", "temperature", "seed"}; each answer is {"text", "words",
    "unknown_words"}. Prompt words outside the vocabulary become `<unk>` and are listed in
    "unknown_words"; an empty prompt starts from a word drawn with the request's seed.
    `on_step(count)` is called after each sampled word (progress reporting).
    """
    index = {w: i for i, w in enumerate(vocab)}
    unk = index.get("<unk>", 0)
    streams, prompts = [], []
    for request in requests:
        if request["temperature"] <= 0:
            raise ValueError(f"temperature must be > 0, got {request['temperature']}")
        words = request["prompt"].split()
        generator = torch.Generator().manual_seed(request["seed"])
        context = [index.get(w, unk) for w in words] or [int(torch.randint(len(vocab), (1,), generator=generator))]
        streams.append(
            Stream(context=context, n_words=request["n_words"], temperature=request["temperature"], generator=generator)
        )
        prompts.append(words)
    sample_streams(model, streams, window, on_step)
    answers = []
    for stream, words in zip(streams, prompts, strict=True):
        unknown = list(dict.fromkeys(w for w in words if w not in index))
        text = join_words(words + [vocab[i] for i in stream.sampled])
        answers.append({"text": text, "words": len(stream.sampled), "unknown_words": unknown})
    return answers


def generate_text(
    model: nn.Module,
    vocab: list[str],
    prompt: str,
    *,
    n_words: int,
    temperature: float,
    seed: int,
    window: int = 35,
    on_word: Callable[[int], None] | None = None,
) -> dict:
    """One request of generate_batch: the same words as in any batch."""
    request = {"prompt": prompt, "n_words": n_words, "temperature": temperature, "seed": seed}
    return generate_batch(model, vocab, [request], window, on_word)[0]
