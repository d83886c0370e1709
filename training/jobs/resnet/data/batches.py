"""Batch-level data path for decoded uint8 images: sampling, augmentation and normalization on any device.

With a CUDA device and `--data-on-gpu`, the whole uint8 array lives on the GPU and these functions
run there per batch; on the CPU the same functions run on batches read from the memory map. They
are device-agnostic, so the CPU tests exercise exactly the GPU code.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

TENSOR_AUGMENTATIONS = ("none", "flip", "flip-crop")


def random_crop(images: torch.Tensor, padding: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Per-sample random crop of (N, C, H, W) images after reflect-padding by `padding` pixels."""
    n, c, h, w = images.shape
    padded = torch.nn.functional.pad(images, (padding,) * 4, mode="reflect")
    dy = torch.randint(0, 2 * padding + 1, (n,), device=images.device, generator=generator)
    dx = torch.randint(0, 2 * padding + 1, (n,), device=images.device, generator=generator)
    rows = (dy[:, None] + torch.arange(h, device=images.device))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w, device=images.device))[:, None, None, :]
    batch = torch.arange(n, device=images.device)[:, None, None, None]
    channel = torch.arange(c, device=images.device)[None, :, None, None]
    return padded[batch, channel, rows, cols]


def random_flip(images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Flip each (N, C, H, W) image horizontally with probability 1/2."""
    flip = torch.rand(images.size(0), device=images.device, generator=generator) < 0.5
    return torch.where(flip[:, None, None, None], images.flip(3), images)


class BatchTransform:
    """uint8 (N, 3, H, W) batch -> normalized float batch, augmented when training."""

    def __init__(self, augment: str, mean: tuple[float, ...], std: tuple[float, ...], *, train: bool):
        if augment not in TENSOR_AUGMENTATIONS:
            raise ValueError(
                f"--augment {augment!r} needs the image-file loader (--data-cache off); decoded batches support "
                f"{', '.join(TENSOR_AUGMENTATIONS)}"
            )
        self.augment, self.train = augment, train
        self.mean = torch.tensor(mean).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(std).view(1, 3, 1, 1) * 255
        self._on_device: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def _constants(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """mean and std on `device`, copied there once (a copy per batch would sync the GPU each time)."""
        if device not in self._on_device:
            self._on_device[device] = (self.mean.to(device), self.std.to(device))
        return self._on_device[device]

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        mean, std = self._constants(images.device)
        x = (images.float() - mean) / std
        if self.train and self.augment == "flip-crop":
            x = random_crop(x, padding=x.size(-1) // 16)
        if self.train and self.augment != "none":
            x = random_flip(x)
        return x


class TensorBatches:
    """Shuffled (or ordered) batches indexed straight out of tensors, e.g. on the GPU: no DataLoader.

    `fetch(indices)` returns (images, labels) for a 1-D index tensor. With `world_size` > 1 each
    rank takes every world_size-th sample of the epoch's permutation; with `equal_shares` (training)
    the permutation is padded, as DistributedSampler pads, so that every rank gets the same number
    of batches: ranks that disagree on the count wait for each other's gradient all-reduce until
    the NCCL timeout. Evaluation needs no padding (no collective per batch) and must not count an
    image twice. `drop_last` skips a final partial batch, so a compiled model sees one shape only.
    """

    def __init__(
        self,
        fetch: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
        size: int,
        batch_size: int,
        *,
        shuffle: bool,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
        equal_shares: bool = True,
        device: torch.device | None = None,
    ):
        self.fetch, self.size, self.batch_size, self.shuffle = fetch, size, batch_size, shuffle
        self.seed, self.rank, self.world_size, self.epoch, self.skip = seed, rank, world_size, 0, 0
        self.drop_last, self.equal_shares = drop_last, equal_shares
        self.device = device  # where fetch indexes: the epoch's indices move there once, not per batch

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """The epoch's permutation; a resumed epoch starts after its first `skip` samples."""
        self.epoch, self.skip = epoch, skip

    @property
    def per_rank(self) -> int:
        """Samples this rank takes per epoch."""
        if self.equal_shares:
            return -(-self.size // self.world_size)
        return len(range(self.rank, self.size, self.world_size))

    def _indices(self) -> torch.Tensor:
        if self.shuffle:
            order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        else:
            order = torch.arange(self.size)
        padding = self.per_rank * self.world_size - self.size if self.equal_shares else 0
        if padding:  # repeat the first samples, as DistributedSampler does
            order = torch.cat([order, order[:padding]])
        return order[self.rank :: self.world_size]

    def __len__(self) -> int:
        left = max(self.per_rank - self.skip, 0)
        if self.drop_last:
            return left // self.batch_size
        return -(-left // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        indices = self._indices()[self.skip :]
        if self.device is not None:
            indices = indices.to(self.device)
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            yield self.fetch(indices[start : start + self.batch_size])
