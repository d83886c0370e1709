"""Image datasets, transforms and data loaders for the classification job."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision import transforms

from training.jobs.resnet.data.dataset import Sample, open_rgb

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
AUGMENTATIONS = ("auto", "none", "flip", "flip-crop", "random-resized-crop", "trivialaugment")
CROP_SHARE = 0.875  # the ImageNet example's center crop: 224 of 256


def resolve_augment(augment: str, layout: str) -> str:
    """--augment auto: flip for Tiny-ImageNet (64x64 images, as today), the ImageNet example's
    random-resized crop + flip for a folder of photos of any size."""
    if augment != "auto":
        return augment
    return "random-resized-crop" if layout == "imagefolder" else "flip"


def resolve_resize(val_resize: int | None, image_size: int, layout: str) -> int:
    """The size images are resized to (shorter side) before the center crop at evaluation:
    --image-size for Tiny-ImageNet (its images are that size), else image_size / 0.875 as the
    ImageNet example (256 for 224)."""
    if val_resize:
        return val_resize
    return round(image_size / CROP_SHARE) if layout == "imagefolder" else image_size


def train_transform(augment: str, image_size: int, resize_size: int | None = None) -> transforms.Compose:
    """Training-time transform; `flip-crop` is the usual 64x64 recipe (reflect-pad 4, crop, flip),
    `random-resized-crop` the ImageNet example's (a random 8-100% area, 3/4-4/3 aspect, then flip)."""
    if augment not in AUGMENTATIONS or augment == "auto":
        raise ValueError(f"--augment {augment!r} is not one of {', '.join(AUGMENTATIONS[1:])}")
    if augment == "random-resized-crop":
        steps: list = [transforms.RandomResizedCrop(image_size), transforms.RandomHorizontalFlip()]
        return transforms.Compose([*steps, transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    steps = [transforms.Resize(resize_size or image_size), transforms.CenterCrop(image_size)]
    if augment in ("flip-crop", "trivialaugment"):
        steps.append(transforms.RandomCrop(image_size, padding=image_size // 16, padding_mode="reflect"))
    if augment != "none":
        steps.append(transforms.RandomHorizontalFlip())
    if augment == "trivialaugment":
        steps.append(transforms.TrivialAugmentWide())
    return transforms.Compose([*steps, transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def eval_transform(image_size: int, resize_size: int | None = None) -> transforms.Compose:
    """Evaluation transform (resize the shorter side, center-crop), also what the serving handler
    reproduces and what the decoded cache stores."""
    return transforms.Compose(
        [
            transforms.Resize(resize_size or image_size),
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
    *,
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
