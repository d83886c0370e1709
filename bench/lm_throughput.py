"""ms/batch and tokens/s of the word-LM training step: the project's loop next to an example-style loop.

Run by hand (not a test):  .venv/bin/python bench/lm_throughput.py [--batches 20] [--device cpu]

Configurations, from the LM issue: the example's Transformer (emsize 200, nhead 2, nhid 200,
2 layers) and a 2x650 LSTM, both with bptt 35, batch 20 and WikiText-2's vocabulary of 33,278
words. Tokens are random ids (the full train split is not on this machine); speed does not
depend on which ids they are. Both loops run the same model classes on the same data, in one process:
- "example": word_language_model's main.py loop: log_softmax + NLLLoss, a manual SGD update
  (p.data.add_(p.grad, alpha=-lr)), loss.item() every batch.
- "project": training.jobs.lm.loop.train_lm_epoch (CrossEntropyLoss, torch.optim.SGD, losses
  summed on the device and read back only at log intervals), with --amp as given.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch
import torch.nn.functional as F

from training.devices import choose_device, synchronize
from training.jobs.lm.loop import LMStep, train_lm_epoch
from training.jobs.lm.wordlm import build_language_model, detach_hidden

CONFIGS = {
    "Transformer 200/2x200": dict(model="Transformer", emsize=200, nhid=200, nlayers=2, nhead=2),
    "LSTM 2x650": dict(model="LSTM", emsize=650, nhid=650, nlayers=2, nhead=2),
}
VOCAB, BPTT, BATCH, LR, CLIP = 33_278, 35, 20, 20.0, 0.25


def example_loop(model, data: torch.Tensor, device: torch.device) -> float:
    """The example's train(): returns seconds for all batches in `data`."""
    model.train()
    hidden = model.init_hidden(BATCH)
    synchronize(device)
    start = time.perf_counter()
    for i in range(0, data.size(0) - 1, BPTT):
        inputs, targets = data[i : i + BPTT].to(device), data[i + 1 : i + 1 + BPTT].reshape(-1).to(device)
        model.zero_grad()
        hidden = detach_hidden(hidden)
        output, hidden = model(inputs, hidden)
        loss = F.nll_loss(F.log_softmax(output, dim=-1), targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        for p in model.parameters():
            p.data.add_(p.grad, alpha=-LR)
        loss.item()  # the example accumulates total_loss += loss.item() each batch
    synchronize(device)
    return time.perf_counter() - start


def project_loop(model, data: torch.Tensor, device: torch.device, amp: str) -> float:
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    result = train_lm_epoch(
        LMStep(model=model, optimizer=optimizer, device=device, bptt=BPTT, clip=CLIP, amp=amp),
        data,
        epoch=1,
        log_interval=10**9,
    )
    return result.seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, default=20, help="timed batches per configuration")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--amp", default="off", choices=["off", "bf16", "fp16"], help="for the project loop")
    args = parser.parse_args()
    device = choose_device(args.device).device
    torch.manual_seed(0)
    tokens = BPTT * BATCH
    data = torch.randint(VOCAB, ((args.batches * BPTT) + 1, BATCH))
    warmup = torch.randint(VOCAB, (2 * BPTT + 1, BATCH))
    print(
        f"# {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}, device {device}, {args.batches} batches of {BATCH}x{BPTT} tokens"
    )
    rows = []
    for name, cfg in CONFIGS.items():
        for loop in ("example", "project"):
            torch.manual_seed(0)
            model = build_language_model(ntokens=VOCAB, dropout=0.2, tied=False, **cfg).to(device)
            run = (
                (lambda d, m=model: example_loop(m, d, device))
                if loop == "example"
                else (lambda d, m=model: project_loop(m, d, device, args.amp))
            )
            run(warmup)
            seconds = run(data)
            ms = 1000 * seconds / args.batches
            rows.append(
                {
                    "config": name,
                    "loop": loop,
                    "amp": "off" if loop == "example" else args.amp,
                    "ms_per_batch": round(ms, 2),
                    "tokens_per_s": round(tokens * args.batches / seconds),
                }
            )
            print(
                f"{name:24s} {loop:8s} amp={rows[-1]['amp']:4s} {ms:9.2f} ms/batch "
                f"{rows[-1]['tokens_per_s']:9d} tokens/s",
                flush=True,
            )
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
