"""Truncated-BPTT training and evaluation of a word-level LM, as in PyTorch's word_language_model."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from training.data.text import get_batch
from training.devices import autocast, synchronize
from training.loops.progress import Progress
from training.models.wordlm import detach_hidden


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 700.0))  # exp overflows past ~709


@dataclass
class LMEpochResult:
    loss: float
    tokens: int
    seconds: float
    batches: int

    @property
    def ppl(self) -> float:
        return perplexity(self.loss)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


def train_lm_epoch(
    model: nn.Module,
    data: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    amp: str,
    epoch: int,
    bptt: int,
    clip: float,
    log_interval: int,
    first_step: int = 0,
    on_interval: Callable[[int, float], None] | None = None,
    dry_run: bool = False,
    scaler: torch.amp.GradScaler | None = None,
    drop_last: bool = False,
) -> LMEpochResult:
    """One pass over `data` (T, batch), ideally already on `device`; `on_interval(global_batch,
    mean_loss)` every log_interval batches. `scaler` scales fp16 losses (gradients are unscaled
    before clipping); `drop_last` skips a final shorter window (a compiled model would recompile)."""
    model.train()
    criterion = nn.CrossEntropyLoss()
    scaler = scaler or torch.amp.GradScaler(device.type, enabled=False)
    hidden = model.init_hidden(data.size(1))
    end = data.size(0) - 1
    if drop_last and end >= bptt:
        end = data.size(0) - bptt  # windows of exactly bptt tokens only
    starts = range(0, end, bptt)
    total_loss, interval_loss, tokens = 0.0, torch.zeros((), device=device), 0
    progress = Progress(enumerate(starts, 1), len(starts), f"epoch {epoch}")
    start = interval_start = time.perf_counter()
    for batch, i in progress:
        inputs, targets = get_batch(data, i, bptt)
        inputs, targets = inputs.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        hidden = detach_hidden(hidden)
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, amp):
            output, hidden = model(inputs, hidden)
            loss = criterion(output.float(), targets)
        scaler.scale(loss).backward()
        if clip:
            scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        scaler.step(optimizer)
        scaler.update()
        interval_loss += loss.detach()
        tokens += targets.numel()
        if batch % log_interval == 0 or dry_run:
            mean = interval_loss.item() / (log_interval if not dry_run else 1)
            total_loss += interval_loss.item()
            interval_loss.zero_()
            ms = (time.perf_counter() - interval_start) * 1000 / (log_interval if not dry_run else 1)
            lr = optimizer.param_groups[0]["lr"]
            progress.print(
                f"| epoch {epoch:3d} | {batch:5d}/{len(starts):5d} batches | lr {lr:02.2f} | ms/batch {ms:5.2f} | "
                f"loss {mean:5.2f} | ppl {perplexity(mean):8.2f}"
            )
            if on_interval:
                on_interval(first_step + batch, mean)
            interval_start = time.perf_counter()
        if dry_run:
            break
    progress.close()
    total_loss += interval_loss.item()
    synchronize(device)
    return LMEpochResult(total_loss / batch, tokens, time.perf_counter() - start, batch)


@torch.no_grad()
def evaluate_lm(model: nn.Module, data: torch.Tensor, device: torch.device, amp: str, bptt: int) -> LMEpochResult:
    """Mean cross-entropy per token over `data` (T, batch), weighting each window by its length."""
    model.eval()
    criterion = nn.CrossEntropyLoss(reduction="sum")
    hidden = model.init_hidden(data.size(1))
    total, tokens = torch.zeros((), dtype=torch.float64, device=device), 0
    start = time.perf_counter()
    batches = 0
    for i in range(0, data.size(0) - 1, bptt):
        inputs, targets = get_batch(data, i, bptt)
        inputs, targets = inputs.to(device), targets.to(device)
        with autocast(device, amp):
            output, hidden = model(inputs, hidden)
        total += criterion(output.float(), targets).double()
        tokens += targets.numel()
        batches += 1
    synchronize(device)
    return LMEpochResult(total.item() / max(tokens, 1), tokens, time.perf_counter() - start, batches)
