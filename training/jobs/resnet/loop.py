"""Train and evaluate a classifier for one epoch, in the style of PyTorch's ImageNet example.

Losses and correct counts are summed on the device and read back only at print points, so the
GPU is not synchronised every batch; sums (not averages) also make cross-process reduction exact.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from training.devices import autocast, synchronize
from training.loops.control import StepControl
from training.loops.progress import Progress

Reduce = Callable[[torch.Tensor], torch.Tensor]


@dataclass(kw_only=True)
class EpochResult:
    loss: float
    acc1: float
    acc5: float
    images: int
    seconds: float
    data_seconds: float
    stopped_at: int | None = None  # the step the epoch stopped after, when it did not finish

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds else 0.0

    @property
    def data_wait_share(self) -> float:
        return self.data_seconds / self.seconds if self.seconds else 0.0


class Totals:
    """Running sums [loss * n, correct@1, correct@5] kept on the device, and the image count n in Python.

    Nothing here reads the GPU back or copies a Python number to it, so adding a batch never
    synchronizes the host with the device.
    """

    def __init__(self, device: torch.device):
        self.sums = torch.zeros(3, dtype=torch.float64, device=device)
        self.count = 0

    def add(self, loss: torch.Tensor, output: torch.Tensor, target: torch.Tensor) -> None:
        n = target.size(0)
        top5 = output.topk(min(5, output.size(1)), dim=1).indices
        hits = top5.eq(target[:, None])
        self.sums += torch.stack([loss.detach().double() * n, hits[:, :1].sum().double(), hits.sum().double()])
        self.count += n

    def reduce(self, reduce: Reduce) -> None:
        """Sum over processes: the count travels with the sums, in one collective."""
        count = torch.tensor([float(self.count)], dtype=torch.float64, device=self.sums.device)
        both = reduce(torch.cat([self.sums, count]))
        self.sums, self.count = both[:3], int(both[3].item())

    def averages(self) -> tuple[float, float, float, int]:
        loss, c1, c5 = self.sums.tolist()
        n = max(self.count, 1)
        return loss / n, 100 * c1 / n, 100 * c5 / n, self.count


def _line(header: str, i: int, total: int, *, batch_time: float, data_time: float, totals: Totals) -> str:
    loss, acc1, acc5, _ = totals.averages()
    width = len(str(total))
    return (
        f"{header}[{i:>{width}}/{total}]  Time {batch_time:6.3f}  Data {data_time:6.3f}  "
        f"Loss {loss:.4e}  Acc@1 {acc1:6.2f}  Acc@5 {acc5:6.2f}"
    )


Prepare = Callable[[torch.Tensor], torch.Tensor]


def to_device(
    images: torch.Tensor, target: torch.Tensor, device: torch.device, *, channels_last: bool, prepare: Prepare | None
):
    """Move a batch to the device; decoded uint8 batches are normalized (and augmented) there.

    The batch leaves in the layout the model was given (channels_last or not): decoded batches
    arrive channels_last-strided (a view of H x W x 3 rows), JPEG batches contiguous.
    """
    images = images.to(device, non_blocking=True)
    if prepare is not None:
        images = prepare(images)
    images = images.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    return images, target.to(device, non_blocking=True)


@dataclass(kw_only=True)
class ClassifierStep:
    """What one training step of a classifier needs; built once per run."""

    model: nn.Module
    criterion: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    device: torch.device
    amp: str = "off"
    channels_last: bool = False
    batch_scheduler: torch.optim.lr_scheduler.LRScheduler | None = None  # one-cycle steps every batch
    prepare: Prepare | None = None  # decoded uint8 batches: normalize and augment on the device

    def __call__(self, images: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        images, target = to_device(images, target, self.device, channels_last=self.channels_last, prepare=self.prepare)
        with autocast(self.device, self.amp):
            output = self.model(images)
            loss = self.criterion(output, target)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.batch_scheduler is not None:
            self.batch_scheduler.step()
        return loss, output, target


def train_one_epoch(
    step: ClassifierStep,
    loader: Iterable,
    *,
    epoch: int,
    print_freq: int,
    reduce: Reduce | None = None,
    control: StepControl | None = None,
    resume: dict[str, Any] | None = None,
) -> EpochResult:
    """One epoch of `loader` (the batches after `resume["step"]` when resuming mid-epoch, with the
    loop's sums and times from then); `control.after_step` may end it early (`stopped_at`)."""
    step.model.train()
    totals = Totals(step.device)
    done, seconds_before, data_seconds = 0, 0.0, 0.0
    if resume:
        done, seconds_before, data_seconds = resume["step"], resume["seconds"], resume["data_seconds"]
        totals.sums, totals.count = resume["sums"].to(step.device), resume["count"]
    total = done + len(loader)
    progress = Progress(loader, len(loader), f"epoch {epoch}")
    start = last = time.perf_counter()
    stopped_at = None
    for i, (images, target) in enumerate(progress, done + 1):
        data_time = time.perf_counter() - last
        data_seconds += data_time
        loss, output, target = step(images, target)
        totals.add(loss, output.float(), target)
        if print_freq and (i % print_freq == 0 or i == total):
            progress.print(
                _line(
                    f"Epoch: [{epoch}]",
                    i,
                    total,
                    batch_time=time.perf_counter() - last,
                    data_time=data_time,
                    totals=totals,
                )
            )
        last = time.perf_counter()

        def snapshot(i: int = i, data_seconds: float = data_seconds) -> dict[str, Any]:  # called right away
            return {"step": i, "sums": totals.sums.cpu(), "count": totals.count,
                    "seconds": seconds_before + time.perf_counter() - start, "data_seconds": data_seconds}  # fmt: skip

        if control is not None and control.after_step(i, snapshot):
            stopped_at = i
            break
    progress.close()
    synchronize(step.device)
    result = _result(totals, seconds_before + time.perf_counter() - start, data_seconds, reduce)
    result.stopped_at = stopped_at
    return result


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable,
    *,
    criterion: nn.Module,
    device: torch.device,
    amp: str = "off",
    print_freq: int = 0,
    channels_last: bool = False,
    reduce: Reduce | None = None,
    on_batch: Callable[[torch.Tensor, torch.Tensor], None] | None = None,
    prepare: Prepare | None = None,
) -> EpochResult:
    """One pass over `loader`; `on_batch(output, target)` sees every batch's logits (e.g. to keep predictions)."""
    model.eval()
    totals = Totals(device)
    progress = Progress(loader, len(loader), "eval")
    data_seconds = 0.0
    start = last = time.perf_counter()
    for i, (images, target) in enumerate(progress, 1):
        data_time = time.perf_counter() - last
        data_seconds += data_time
        images, target = to_device(images, target, device, channels_last=channels_last, prepare=prepare)
        with autocast(device, amp):
            output = model(images)
            loss = criterion(output, target)
        totals.add(loss, output.float(), target)
        if on_batch is not None:
            on_batch(output.float(), target)
        if print_freq and (i % print_freq == 0 or i == len(loader)):
            progress.print(
                _line(
                    "Test: ", i, len(loader), batch_time=time.perf_counter() - last, data_time=data_time, totals=totals
                )
            )
        last = time.perf_counter()
    progress.close()
    synchronize(device)
    result = _result(totals, time.perf_counter() - start, data_seconds, reduce)
    print(f" * Acc@1 {result.acc1:.3f} Acc@5 {result.acc5:.3f}", flush=True)
    return result


def _result(totals: Totals, seconds: float, data_seconds: float, reduce: Reduce | None) -> EpochResult:
    if reduce is not None:
        totals.reduce(reduce)
    loss, acc1, acc5, n = totals.averages()
    return EpochResult(loss=loss, acc1=acc1, acc5=acc5, images=n, seconds=seconds, data_seconds=data_seconds)
