"""Evaluate a classifier checkpoint on a dataset split and log the result as an MLflow run."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from training.data.errors import DatasetError
from training.devices import choose_device
from training.jobs.evaluate import EvaluateOptions, evaluation_run
from training.jobs.resnet import ResNetConfig
from training.jobs.resnet.classifier import classifier_from_checkpoint
from training.jobs.resnet.data.dataset import Sample
from training.jobs.resnet.data.images import ImageFiles, eval_transform, make_loader, take_evenly
from training.jobs.resnet.data.index import load_image_dataset
from training.jobs.resnet.loop import EpochResult, evaluate
from training.jobs.resnet.metrics import ACC1, ACC5, IMAGES_PER_SECOND
from training.metrics import VAL_LOSS, eval_metric_name


def check_same_classes(checkpoint_classes: list[str], dataset_classes: list[str], checkpoint: Path, data: Path) -> None:
    if checkpoint_classes != dataset_classes:
        missing = sorted(set(dataset_classes) - set(checkpoint_classes))[:5]
        raise DatasetError(
            f"{data} has {len(dataset_classes)} classes but checkpoint {checkpoint} was trained on "
            f"{len(checkpoint_classes)} different ones (e.g. not in the checkpoint: {missing})"
        )


def evaluate_samples(
    state: dict,
    samples: list[Sample],
    device: torch.device,
    *,
    batch_size: int,
    workers: int,
    amp: str = "off",
    print_freq: int = 0,
    on_batch: Callable[[torch.Tensor, torch.Tensor], None] | None = None,
) -> EpochResult:
    """One ordered, batched pass of a ResNet checkpoint's model over `samples` (evaluation transform)."""
    model = classifier_from_checkpoint(state).to(device)
    transform = eval_transform(state["image_size"], state.get("resize_size"))  # checkpoints before 2026-12: none
    loader = make_loader(ImageFiles(samples, transform), batch_size, workers, device=device)
    return evaluate(model, loader, criterion=nn.CrossEntropyLoss(), device=device, amp=amp, print_freq=print_freq,
                    on_batch=on_batch)  # fmt: skip


def evaluate_checkpoint(state: dict, source: str, data: Path, options: EvaluateOptions) -> EpochResult:
    """`dlops evaluate` of a classifier: Acc@1/Acc@5 of checkpoint `state` on DATA's split, an MLflow run."""
    ds = load_image_dataset(data)
    check_same_classes(state["classes"], ds.classes, source, data)
    choice = choose_device(options.device)
    print(choice.describe(), flush=True)
    split, batch_size, amp = options.split, options.batch_size, options.amp
    samples = take_evenly(ds.split(split), options.limit)

    with evaluation_run(state, source=source, data=data, split=split, device_name=choice.name,
                        experiment=ResNetConfig.experiment) as run:  # fmt: skip
        run.log_params({"images": len(samples), "batch_size": batch_size, "amp": amp})
        result = evaluate_samples(state, samples, choice.device, batch_size=batch_size, workers=options.workers,
                                  amp=amp, print_freq=options.print_freq)  # fmt: skip
        run.log_metrics({eval_metric_name(VAL_LOSS.name): result.loss, eval_metric_name(ACC1.name): result.acc1,
                         eval_metric_name(ACC5.name): result.acc5, IMAGES_PER_SECOND: result.images_per_second},
                        step=0)  # fmt: skip
    return result
