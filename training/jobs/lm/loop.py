"""Truncated-BPTT training and evaluation of a word-level LM, as in PyTorch's word_language_model."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from training.devices import autocast, synchronize
from training.jobs.lm.corpus import get_batch
from training.jobs.lm.wordlm import detach_hidden
from training.loops.control import StepControl
from training.loops.progress import Progress


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 700.0))  # exp overflows past ~709


@dataclass(kw_only=True)
class LMEpochResult:
    loss: float
    tokens: int
    seconds: float
    batches: int
    stopped_at: int | None = None  # the window the epoch stopped after, when it did not finish

    @property
    def ppl(self) -> float:
        return perplexity(self.loss)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


@dataclass(kw_only=True)
class LMStep:
    """What one truncated-BPTT step of a language model needs; built once per run."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    device: torch.device
    bptt: int
    clip: float
    amp: str = "off"
    scaler: torch.amp.GradScaler | None = None  # fp16: losses scaled, gradients unscaled before clipping

    def __post_init__(self) -> None:
        self.scaler = self.scaler or torch.amp.GradScaler(self.device.type, enabled=False)
        self.criterion = nn.CrossEntropyLoss()

    def __call__(self, inputs: torch.Tensor, targets: torch.Tensor, hidden: Any) -> tuple[torch.Tensor, Any]:
        inputs, targets = inputs.to(self.device, non_blocking=True), targets.to(self.device, non_blocking=True)
        hidden = detach_hidden(hidden)
        self.optimizer.zero_grad(set_to_none=True)
        with autocast(self.device, self.amp):
            output, hidden = self.model(inputs, hidden)
            loss = self.criterion(output.float(), targets)
        self.scaler.scale(loss).backward()
        if self.clip:
            self.scaler.unscale_(self.optimizer)  # clip the true gradients, not the scaled ones
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return loss, hidden


def _on_cpu(hidden: Any) -> Any:
    if hidden is None or isinstance(hidden, torch.Tensor):
        return None if hidden is None else hidden.detach().cpu()
    return tuple(h.detach().cpu() for h in hidden)


def _on_device(hidden: Any, device: torch.device) -> Any:
    if hidden is None or isinstance(hidden, torch.Tensor):
        return None if hidden is None else hidden.to(device)
    return tuple(h.to(device) for h in hidden)


def windows(data: torch.Tensor, bptt: int, *, drop_last: bool) -> range:
    """Where each truncated-BPTT window of `data` (T, batch) starts; `drop_last`: full windows only."""
    end = data.size(0) - 1
    if drop_last and end >= bptt:
        end = data.size(0) - bptt
    return range(0, end, bptt)


def interval_line(step: LMStep, *, epoch: int, batch: int, batches: int, mean: float, ms: float) -> str:
    """The example's progress line."""
    lr = step.optimizer.param_groups[0]["lr"]
    return (f"| epoch {epoch:3d} | {batch:5d}/{batches:5d} batches | lr {lr:02.2f} | ms/batch {ms:5.2f} | "
            f"loss {mean:5.2f} | ppl {perplexity(mean):8.2f}")  # fmt: skip


def _resumed(resume: dict[str, Any]) -> tuple[int, float, float, int, float]:
    """Where a stopped epoch left off: windows done, loss sums, tokens and seconds so far."""
    return tuple(resume[k] for k in ("step", "total_loss", "interval_loss", "tokens", "seconds"))


def train_lm_epoch(
    step: LMStep,
    data: torch.Tensor,
    *,
    epoch: int,
    log_interval: int,
    first_step: int = 0,
    on_interval: Callable[[int, float], None] | None = None,
    dry_run: bool = False,
    drop_last: bool = False,
    control: StepControl | None = None,
    resume: dict[str, Any] | None = None,
) -> LMEpochResult:
    """One pass over `data` (T, batch), ideally already on the device; `on_interval(global_batch,
    mean_loss)` every log_interval batches. `drop_last` skips a final shorter window (a compiled
    model would recompile). `resume` continues an epoch stopped after `resume["step"]` windows (its
    hidden state and sums); `control.after_step` may end it early (`stopped_at`)."""
    step.model.train()
    bptt = step.bptt
    hidden = step.model.init_hidden(data.size(1))
    starts = windows(data, bptt, drop_last=drop_last)
    done, total_loss, interval, tokens, seconds_before = _resumed(resume) if resume else (0, 0.0, 0.0, 0, 0.0)
    if resume:
        hidden = _on_device(resume["hidden"], step.device)
    interval_loss = torch.tensor(interval, device=step.device)
    progress = Progress(zip(range(done + 1, len(starts) + 1), starts[done:], strict=True), len(starts) - done,
                        f"epoch {epoch}")  # fmt: skip
    start = interval_start = time.perf_counter()
    batch, stopped_at = done, None
    for batch, i in progress:
        inputs, targets = get_batch(data, i, bptt)
        loss, hidden = step(inputs, targets, hidden)
        interval_loss += loss.detach()
        tokens += targets.numel()
        if batch % log_interval == 0 or dry_run:
            every = 1 if dry_run else log_interval
            mean = interval_loss.item() / every
            total_loss += interval_loss.item()
            interval_loss.zero_()
            ms = (time.perf_counter() - interval_start) * 1000 / every
            progress.print(interval_line(step, epoch=epoch, batch=batch, batches=len(starts), mean=mean, ms=ms))
            if on_interval:
                on_interval(first_step + batch, mean)
            interval_start = time.perf_counter()
        if dry_run:
            break

        def snapshot(batch: int = batch, hidden: Any = hidden, total_loss: float = total_loss, tokens: int = tokens,
                     interval: torch.Tensor = interval_loss) -> dict[str, Any]:  # fmt: skip
            return {"step": batch, "total_loss": total_loss, "interval_loss": interval.item(), "tokens": tokens,
                    "hidden": _on_cpu(hidden), "seconds": seconds_before + time.perf_counter() - start}  # fmt: skip

        if control is not None and control.after_step(batch, snapshot):
            stopped_at = batch
            break
    progress.close()
    total_loss += interval_loss.item()
    synchronize(step.device)
    return LMEpochResult(loss=total_loss / max(batch, 1), tokens=tokens, batches=batch, stopped_at=stopped_at,
                         seconds=seconds_before + time.perf_counter() - start)  # fmt: skip


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
    return LMEpochResult(
        loss=total.item() / max(tokens, 1), tokens=tokens, seconds=time.perf_counter() - start, batches=batches
    )
