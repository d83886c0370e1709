"""The ResNet job: data -> model -> epochs -> MLflow/TensorBoard and checkpoints, top to bottom."""

from __future__ import annotations

import math
import os
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from training import tracking
from training.checkpoint import restore_rng_state, rng_state, seed_everything
from training.data.images import IMAGENET_MEAN, IMAGENET_STD
from training.data.pipeline import build_pipeline
from training.devices import choose_device, grad_scaler
from training.distributed import close_process_group, init_process_group
from training.loops.classify import EpochResult, evaluate, train_one_epoch
from training.models.resnet import build_resnet
from training.models.summary import layer_table
from training.plots import RESNET_PANELS
from training.session import load_resume, training_session

SCHEDULERS = ("step", "cosine", "one-cycle")
DEFAULT_WORKERS = min(4, os.cpu_count() or 1)
# Options a resumed run may change without making its logged params untrue.
RESUMABLE = {"epochs", "workers", "print_freq", "device", "early_stop_patience", "out_dir", "tags"}


@dataclass
class ResNetConfig:
    data: str | None = None
    arch: str = "resnet18"
    stem: str = "imagenet"
    image_size: int = 64
    batch_size: int = 256
    epochs: int = 20
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 1e-4
    norm_weight_decay: bool = True  # False: no weight decay on BatchNorm weights and biases
    scheduler: str = "step"
    lr_step_size: int = 30
    lr_gamma: float = 0.1
    label_smoothing: float = 0.0
    augment: str = "flip"
    amp: str = "off"
    channels_last: bool = False
    compile: bool = False
    workers: int = DEFAULT_WORKERS
    seed: int = 0
    device: str = "auto"
    dummy: bool = False
    data_cache: str = "auto"  # auto: use a decoded cache when one matches; off; or a cache folder to build/use
    data_on_gpu: str = "auto"  # auto: with CUDA, when the cache fits in half the free GPU memory; on; off
    recipe: str = "reference"
    limit_train: int | None = None
    limit_val: int | None = None
    print_freq: int = 10
    early_stop_patience: int = 0
    experiment: str = "resnet-tinyimagenet"
    run_name: str | None = None
    registered_model: str = "resnet-tinyimagenet"
    out_dir: str = "runs"
    nproc_per_node: int = 1
    tags: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # checkpoints store this config and load with weights_only=True: plain strings, never Paths
        self.data = None if self.data is None else str(self.data)


@dataclass
class TrainState:
    """What survives between epochs and across a resume."""

    epoch: int = 0
    best_acc1: float = -1.0
    best_epoch: int = 0
    best_val_loss: float = math.inf
    epochs_since_improvement: int = 0
    train_seconds: float = 0.0
    seconds_to_best: float = 0.0

    def update(self, epoch: int, val: EpochResult, seconds: float) -> bool:
        """Record a finished epoch; return whether it is the best so far by val Acc@1."""
        self.epoch = epoch
        self.train_seconds += seconds
        improved = val.acc1 > self.best_acc1
        if improved:
            self.best_acc1, self.best_epoch, self.seconds_to_best = val.acc1, epoch, self.train_seconds
        if val.loss < self.best_val_loss:
            self.best_val_loss, self.epochs_since_improvement = val.loss, 0
        else:
            self.epochs_since_improvement += 1
        return improved


def build_optimizer(config: ResNetConfig, model: nn.Module, device: torch.device) -> torch.optim.Optimizer:
    """SGD (nesterov optional); weight decay on conv/linear weights only when norm_weight_decay is off."""
    decay = [p for p in model.parameters() if p.ndim > 1 or config.norm_weight_decay]
    no_decay = [p for p in model.parameters() if p.ndim <= 1 and not config.norm_weight_decay]
    groups = [{"params": decay, "weight_decay": config.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    fused = device.type in ("cuda", "cpu")  # one kernel per step instead of one per parameter
    return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, nesterov=config.nesterov, fused=fused)


def _example_input(data, device: torch.device) -> torch.Tensor:
    """One validation image as the model sees it (for the summary table and the graph)."""
    images = next(iter(data.val))[0][:1].to(device)
    return data.prepare_val(images) if data.prepare_val else images


def build_scheduler(config: ResNetConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int):
    """Return (scheduler, steps_per_batch): one-cycle steps every batch, the others every epoch."""
    if config.scheduler == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, config.lr_step_size, config.lr_gamma), False
    if config.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs), False
    if config.scheduler == "one-cycle":
        return (
            torch.optim.lr_scheduler.OneCycleLR(
                optimizer, max_lr=config.lr, epochs=config.epochs, steps_per_epoch=steps_per_epoch
            ),
            True,
        )
    raise ValueError(f"--scheduler {config.scheduler!r} is not one of {', '.join(SCHEDULERS)}")


def epoch_metrics(train: EpochResult, val: EpochResult, lr: float, seconds: float) -> dict[str, float]:
    return {
        "train/loss": train.loss,
        "train/acc1": train.acc1,
        "train/acc5": train.acc5,
        "train/images": train.images,
        "val/loss": val.loss,
        "val/acc1": val.acc1,
        "val/acc5": val.acc5,
        "lr": lr,
        "time/epoch_seconds": seconds,
        "time/images_per_second": train.images_per_second,
        "time/data_wait_share": train.data_wait_share,
    }


def train_resnet(config: ResNetConfig, resume: Path | None = None) -> Path:
    """Train (or resume) a ResNet; return the run directory holding best.pt and last.pt."""
    saved = load_resume(resume, "resnet")
    choice = choose_device(config.device)
    device = choice.device
    group = init_process_group(device)
    if group.enabled and device.type == "cuda":
        device = torch.device("cuda", group.local_rank)
    print(choice.describe(), flush=True)
    seed_everything(config.seed)

    # --batch-size is the global batch, as in the ImageNet example: each process takes its share.
    per_process_batch = config.batch_size // group.world_size
    if per_process_batch < 1:
        raise ValueError(f"--batch-size {config.batch_size} is smaller than the {group.world_size} processes")
    data = build_pipeline(config, per_process_batch, device, group)
    print(f"=> {data.tags['train_images']} train / {data.tags['val_images']} val images, {len(data.classes)} "
          f"classes; data path: {data.tags['data_path']}")  # fmt: skip

    model = build_resnet(config.arch, len(data.classes), config.stem).to(device)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(config, model, device)
    scheduler, per_batch = build_scheduler(config, optimizer, len(data.train))
    scaler = grad_scaler(device, config.amp)
    train_criterion = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    val_criterion = nn.CrossEntropyLoss()
    state = TrainState()
    if saved:
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        scaler.load_state_dict(saved["scaler"])
        restore_rng_state(saved["rng"])
        state = TrainState(**saved["train_state"])
    # DDP averages gradients across processes; evaluation uses the plain module (no collectives).
    trained = model
    if group.enabled:
        trained = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    reduce = group.sum if group.enabled else None
    parallel = {
        "world_size": group.world_size,
        "global_batch_size": per_process_batch * group.world_size,
        "per_process_batch_size": per_process_batch,
        "lr_scaling": "none (--batch-size is the global batch)",
    }

    tags = {**data.tags, **config.tags}
    with training_session(config, "resnet", saved, resume, choice, tags, parallel, group.is_main) as session:
        run = session.run
        if saved:
            session.catch_up(saved, "val/acc1")
        elif session.active:
            example = _example_input(data, device)
            run.log_text(layer_table(model, example), "model_summary.txt")
            _add_graph(run, model, example)

        trained = torch.compile(trained) if config.compile else trained
        stop_reason = f"completed {config.epochs} epochs"
        for epoch in range(state.epoch + 1, config.epochs + 1):
            data.set_epoch(epoch)
            lr = optimizer.param_groups[0]["lr"]
            start = time.perf_counter()
            train = train_one_epoch(
                trained, data.train, train_criterion, optimizer, scaler, device, config.amp, epoch,
                config.print_freq, config.channels_last, scheduler if per_batch else None, reduce, data.prepare_train,
            )  # fmt: skip
            val = evaluate(
                model, data.val, val_criterion, device, config.amp, config.print_freq, config.channels_last, reduce,
                prepare=data.prepare_val,
            )  # fmt: skip
            if not per_batch:
                scheduler.step()
            seconds = time.perf_counter() - start
            improved = state.update(epoch, val, seconds)
            metrics = epoch_metrics(train, val, lr, seconds)
            print(
                f"=> epoch {epoch}/{config.epochs}: train loss {train.loss:.4f} Acc@1 {train.acc1:.2f} | "
                f"val loss {val.loss:.4f} Acc@1 {val.acc1:.2f} Acc@5 {val.acc5:.2f} | {seconds:.1f} s, "
                f"{train.images_per_second:.0f} img/s, {100 * train.data_wait_share:.0f}% waiting for data",
                flush=True,
            )
            # Checkpoint first, then metrics: a resume logs whatever a crash in between left out.
            session.save_epoch(
                {
                    "kind": "resnet",
                    "format_version": 1,
                    "epoch": epoch,
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict(),
                    "train_state": asdict(state),
                    "metrics": metrics,
                    "rng": rng_state(),
                    "config": asdict(config),
                    "classes": data.classes,
                    "labels": data.labels,
                    "image_size": config.image_size,
                    "normalization": {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)},
                    "experiment": config.experiment,
                },
                improved,
            )
            run.log_metrics(metrics, step=epoch)
            run.sync_tensorboard()
            if config.early_stop_patience and state.epochs_since_improvement >= config.early_stop_patience:
                stop_reason = (
                    f"early stop: val loss has not improved for {state.epochs_since_improvement} epochs "
                    f"(best {state.best_val_loss:.4f})"
                )
                print(f"=> {stop_reason}")
                break

        run.log_metrics(
            {
                "time/total_seconds": state.train_seconds,
                "time/to_best_seconds": state.seconds_to_best,
                "best/val_acc1": state.best_acc1,
                "best/epoch": state.best_epoch,
            },
            step=state.epoch,
        )
        run.set_tags({"stop_reason": stop_reason})
        best = {"val_acc1": f"{state.best_acc1:.3f}", "epoch": str(state.best_epoch)}
        session.publish(config.registered_model, best, RESNET_PANELS)
    close_process_group(group)
    return session.run_dir


def _add_graph(run: tracking.RunTracker, model: nn.Module, example: torch.Tensor) -> None:
    model.eval()
    try:
        with warnings.catch_warnings():  # add_graph traces with torch.jit, which warns it is deprecated
            warnings.simplefilter("ignore", FutureWarning)
            run.writer.add_graph(model, example)
    except Exception as e:  # tracing is a nicety; never fail a training run over it
        print(f"warning: TensorBoard graph not written: {e}")


def main() -> None:
    """Entry point for torchrun: `python -m training.train_resnet --config CONFIG.json [--resume CKPT]`."""
    import argparse
    import json

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--resume", type=Path, default=None)
    args = parser.parse_args()
    train_resnet(ResNetConfig(**json.loads(args.config.read_text(encoding="utf-8"))), args.resume)


if __name__ == "__main__":
    main()
