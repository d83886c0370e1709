"""Image datasets, transforms and data loaders for the classification job."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision import transforms

from training.data.tinyimagenet import Sample, open_rgb

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
AUGMENTATIONS = ("none", "flip", "flip-crop", "trivialaugment")


def train_transform(augment: str, image_size: int) -> transforms.Compose:
    """Training-time transform; `flip-crop` is the usual 64x64 recipe (reflect-pad 4, crop, flip)."""
    if augment not in AUGMENTATIONS:
        raise ValueError(f"--augment {augment!r} is not one of {', '.join(AUGMENTATIONS)}")
    steps: list = [transforms.Resize(image_size), transforms.CenterCrop(image_size)]
    if augment in ("flip-crop", "trivialaugment"):
        steps.append(transforms.RandomCrop(image_size, padding=image_size // 16, padding_mode="reflect"))
    if augment != "none":
        steps.append(transforms.RandomHorizontalFlip())
    if augment == "trivialaugment":
        steps.append(transforms.TrivialAugmentWide())
    return transforms.Compose([*steps, transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def eval_transform(image_size: int) -> transforms.Compose:
    """Evaluation transform, also what the serving handler reproduces."""
    return transforms.Compose(
        [
            transforms.Resize(image_size),
            transforms.CenterCrop(image_size),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


class ImageFiles(Dataset):
    """(image, label) pairs decoded from files on demand."""

    def __init__(self, samples: Sequence[Sample], transform: transforms.Compose):
        self.samples = list(samples)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[i]
        return self.transform(open_rgb(path)), label

    @property
    def paths(self) -> list[Path]:
        return [path for path, _ in self.samples]


def evenly_spaced(n: int, limit: int | None) -> list[int]:
    """At most `limit` of range(n), spread evenly: on a class-sorted list every class stays."""
    if not limit or limit >= n:
        return list(range(n))
    step = n / limit
    return [int(i * step) for i in range(limit)]


def take_evenly(samples: Sequence[Sample], limit: int | None) -> list[Sample]:
    return [samples[i] for i in evenly_spaced(len(samples), limit)]


def make_loader(
    dataset: Dataset,
    batch_size: int,
    workers: int,
    device: torch.device,
    shuffle: bool = False,
    sampler: Sampler | None = None,
    seed: int = 0,
    collate_fn: Callable | None = None,
    drop_last: bool = False,
) -> DataLoader:
    """A DataLoader; `seed` seeds the workers' RNGs (augmentation), so give each process its own."""
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle and sampler is None,
        sampler=sampler,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=workers > 0,
        generator=generator,
        collate_fn=collate_fn,
        drop_last=drop_last,
    )
