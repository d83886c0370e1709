"""Choose how the classification job gets its batches, and build it.

    --dummy                          random tensors (throughput checks, no files)
    --data-cache off, or an augmentation that needs the full image (random-resized crop)
                                     image files decoded by PIL in DataLoader workers
    a decoded cache, CPU             uint8 batches read from the memory map (in the main process
                                     unless -j asks for workers: a batch is a memory copy)
    a decoded cache, --data-on-gpu   the whole uint8 array on the GPU, batches indexed there

With `--data-cache auto` the cache is used when it matches the dataset and built when it does
not (once: about 30 s for Tiny-ImageNet's 110,000 images on 2 cores, where decoding the JPEGs
every epoch costs minutes). The last two return uint8 batches plus a `prepare` function
(normalize, augment) that the loop applies on the training device.
"""

from __future__ import annotations

import dataclasses
import itertools
import shutil
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DistributedSampler, Subset

from training.data import LOADER_WORKERS
from training.distributed import ProcessGroup
from training.jobs.resnet.data.batches import TENSOR_AUGMENTATIONS, BatchTransform, TensorBatches
from training.jobs.resnet.data.cache import (
    CachedImages,
    DecodedSplit,
    build_cache,
    cache_root,
    collate_batch,
    find_cache,
)
from training.jobs.resnet.data.dataset import ImageDataset
from training.jobs.resnet.data.images import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageFiles,
    eval_transform,
    evenly_spaced,
    make_loader,
    resolve_augment,
    resolve_resize,
    take_evenly,
    train_transform,
)
from training.jobs.resnet.data.index import load_image_dataset
from training.jobs.resnet.data.synthetic import RandomImages, synthetic_wnid

DUMMY_SIZES = (100_000, 10_000)  # Tiny-ImageNet's train and val sizes
GPU_MEMORY_SHARE = 0.5  # put the cache on the GPU when it takes at most this share of free memory
DISK_MARGIN = 1.2  # build a cache only where the disk has room for it and a fifth more
JPEG_WORKERS = LOADER_WORKERS  # DataLoader workers decoding image files (-j's default there)


@dataclass(kw_only=True)
class ImagePipeline:
    train: Iterable
    val: Iterable
    classes: list[str]
    labels: list[str]
    tags: dict[str, Any]
    prepare_train: Callable[[torch.Tensor], torch.Tensor] | None = None
    prepare_val: Callable[[torch.Tensor], torch.Tensor] | None = None
    epoch_setters: list = field(default_factory=list)
    batch_size: int = 1  # per process
    augment: str = "flip"  # what --augment auto resolved to for this dataset
    resize_size: int | None = None  # the evaluation transform's resize before its center crop
    workers: int = 0  # DataLoader workers, as -j resolved for this data path

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        """Reshuffle per epoch, identically on every process; a resumed epoch starts after its first
        `skip_batches` batches (the same order: a permutation of the seed and the epoch)."""
        for target in self.epoch_setters:
            target.set_epoch(epoch, skip=skip_batches * self.batch_size)


def build_pipeline(config: Any, batch_size: int, device: torch.device, group: ProcessGroup | None = None):
    """Batches for `config` (a ResNetConfig), `batch_size` per process, this process's share."""
    group = group or ProcessGroup()
    rank, world_size = group.rank, group.world_size
    if config.dummy:
        return _dummy(config, batch_size, device, rank, world_size)
    ds = load_image_dataset(config.data)
    # --augment auto and the evaluation resize follow the dataset: Tiny-ImageNet as always, photos
    # of any size the ImageNet example's way; the pipeline carries the resolved values (the job
    # records them as its options)
    augment = resolve_augment(config.augment, ds.layout)
    val_resize = resolve_resize(config.val_resize, config.image_size, ds.layout)
    config = dataclasses.replace(config, augment=augment, val_resize=val_resize)
    # A cache to build is built once per cache folder: the first process takes its lock and decodes, the
    # others (this machine's, or every node's where the folder is shared) wait for it (data/cache.py)
    caches = _find_caches(config, ds)
    if caches is None:
        config = dataclasses.replace(config, workers=JPEG_WORKERS if config.workers is None else config.workers)
        return _jpeg(config, ds, batch_size, device=device, rank=rank, world_size=world_size)
    # From the cache a batch is a memory copy: on a CPU, worker processes would only take cores from the model
    if config.workers is None:
        config = dataclasses.replace(config, workers=0 if device.type == "cpu" else JPEG_WORKERS)
    return _cached(config, ds, caches, batch_size=batch_size, device=device, rank=rank, world_size=world_size)


def _share(indices: list[int], rank: int, world_size: int) -> list[int]:
    return indices[rank::world_size]


class EpochSampler(DistributedSampler):
    """DistributedSampler (the same permutation of (seed, epoch) on every rank, each its share) whose
    epoch can start after its first `skip` samples: a mid-epoch resume trains the rest, in order."""

    skip = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        super().set_epoch(epoch)
        self.skip = skip

    def __iter__(self) -> Iterator[int]:
        return itertools.islice(super().__iter__(), self.skip, None)

    def __len__(self) -> int:
        return max(super().__len__() - self.skip, 0)


def _loader(dataset, config, batch_size, *, device, rank, world_size, train: bool, collate=None):
    """A DataLoader over `dataset`; training batches are shuffled by a permutation of (seed, epoch),
    as DistributedSampler draws it (the same on every rank), so a resumed run sees the same order
    as an uninterrupted one. Workers' augmentation RNGs differ per rank. A compiled model gets no
    final partial batch (a new shape would recompile it)."""
    sampler = EpochSampler(dataset, world_size, rank, shuffle=True, seed=config.seed) if train else None
    loader = make_loader(dataset, batch_size, config.workers, device=device, sampler=sampler, seed=config.seed + rank,
                         collate_fn=collate, drop_last=train and config.compile)  # fmt: skip
    return loader, sampler


def _dummy(config, batch_size, device, rank, world_size) -> ImagePipeline:
    config = dataclasses.replace(config, workers=JPEG_WORKERS if config.workers is None else config.workers)
    n_train, n_val = config.limit_train or DUMMY_SIZES[0], config.limit_val or DUMMY_SIZES[1]
    classes = [synthetic_wnid(i) for i in range(200)]
    train_set = RandomImages(n_train, len(classes), config.image_size, seed=config.seed)
    val_set = Subset(RandomImages(n_val, len(classes), config.image_size, seed=config.seed + 1),
                     _share(list(range(n_val)), rank, world_size))  # fmt: skip
    train, sampler = _loader(train_set, config, batch_size, device=device, rank=rank, world_size=world_size, train=True)
    val, _ = _loader(val_set, config, batch_size, device=device, rank=rank, world_size=world_size, train=False)
    tags = {"dataset": "dummy", "train_images": n_train, "val_images": n_val, "data_path": "random tensors"}
    config = dataclasses.replace(config, augment=resolve_augment(config.augment, "dummy"))
    return ImagePipeline(
        train=train,
        val=val,
        classes=classes,
        labels=classes,
        tags=tags,
        epoch_setters=[sampler],
        batch_size=batch_size,
        augment=config.augment,
        workers=config.workers,
    )


def _dataset_tags(config, ds: ImageDataset, n_train: int, n_val: int, path: str) -> dict[str, Any]:
    return {
        "dataset": str(Path(config.data).resolve()),
        "dataset_layout": ds.layout,
        "train_images": n_train,
        "val_images": n_val,
        "num_classes": ds.num_classes,
        "val_layout": ds.val_layout,
        "data_path": path,
    }


def _jpeg(config, ds: ImageDataset, batch_size, *, device, rank, world_size) -> ImagePipeline:
    transform = train_transform(config.augment, config.image_size, config.val_resize)
    train_set = ImageFiles(take_evenly(ds.train, config.limit_train), transform)
    val_samples = take_evenly(ds.val, config.limit_val)
    val_set = ImageFiles(_share(val_samples, rank, world_size), eval_transform(config.image_size, config.val_resize))
    train, sampler = _loader(train_set, config, batch_size, device=device, rank=rank, world_size=world_size, train=True)
    val, _ = _loader(val_set, config, batch_size, device=device, rank=rank, world_size=world_size, train=False)
    tags = _dataset_tags(config, ds, len(train_set), len(val_samples), "image files (PIL in DataLoader workers)")
    return ImagePipeline(
        train=train,
        val=val,
        classes=ds.classes,
        labels=ds.class_labels,
        tags=tags,
        epoch_setters=[sampler],
        batch_size=batch_size,
        augment=config.augment,
        resize_size=config.val_resize,
        workers=config.workers,
    )


def _find_caches(config, ds: ImageDataset) -> tuple[DecodedSplit, DecodedSplit] | None:
    """The decoded caches of both splits: found or built (auto, or a folder), or not used (off, an
    augmentation that needs the full images, or no room on the disk: each said, with the reason)."""
    if config.data_cache == "off":
        return None
    sizes = {"image_size": config.image_size, "resize_size": config.val_resize}
    if config.augment not in TENSOR_AUGMENTATIONS:
        print(f"=> reading the image files every epoch: --augment {config.augment} crops the full images, and the "
              "decoded cache holds their center crops (--augment flip or flip-crop read it)")  # fmt: skip
        return None
    root = cache_root() if config.data_cache == "auto" else Path(config.data_cache)
    found = [find_cache(ds, split, root, **sizes) for split in ("train", "val")]
    if None not in found:
        return found[0], found[1]
    needed = (len(ds.train) + len(ds.val)) * 3 * config.image_size**2
    root.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(root).free
    if free < DISK_MARGIN * needed:
        print(f"=> no decoded cache of {config.data} in {root}, and no room to build one ({needed / 1e9:.1f} GB "
              f"needed, {free / 1e9:.1f} GB free): decoding images every epoch")  # fmt: skip
        return None
    print(f"=> no decoded cache of {config.data} in {root} yet ({needed / 1e9:.2f} GB): it is decoded once and "
          "later runs read it (`dlops data cache` builds it ahead)", flush=True)  # fmt: skip
    return build_cache(ds, split="train", root=root, **sizes), build_cache(ds, split="val", root=root, **sizes)


def _on_gpu(config, caches: tuple[DecodedSplit, DecodedSplit], device: torch.device) -> bool:
    if device.type != "cuda" or config.data_on_gpu == "off":
        return False
    if config.data_on_gpu == "on":
        return True
    free, _ = torch.cuda.mem_get_info(device)
    return sum(c.images.nbytes for c in caches) <= GPU_MEMORY_SHARE * free


def _cached(config, ds: ImageDataset, caches, *, batch_size, device, rank, world_size) -> ImagePipeline:
    train_cache, val_cache = caches
    train_rows = evenly_spaced(len(train_cache.labels), config.limit_train)
    val_rows = evenly_spaced(len(val_cache.labels), config.limit_val)
    prepare_train = BatchTransform(config.augment, IMAGENET_MEAN, IMAGENET_STD, train=True)
    prepare_val = BatchTransform("none", IMAGENET_MEAN, IMAGENET_STD, train=False)
    if _on_gpu(config, caches, device):
        train = _resident(
            train_cache,
            train_rows,
            batch_size,
            device=device,
            train=True,
            config=config,
            rank=rank,
            world_size=world_size,
        )
        val = _resident(
            val_cache, val_rows, batch_size, device=device, train=False, config=config, rank=rank, world_size=world_size
        )
        setters, path = [train], f"decoded cache {train_cache.directory.parent} on the GPU"
    else:
        train, sampler = _loader(
            CachedImages(train_cache, np.array(train_rows)),
            config,
            batch_size,
            device=device,
            rank=rank,
            world_size=world_size,
            train=True,
            collate=collate_batch,
        )
        val, _ = _loader(
            CachedImages(val_cache, np.array(_share(val_rows, rank, world_size))),
            config,
            batch_size,
            device=device,
            rank=rank,
            world_size=world_size,
            train=False,
            collate=collate_batch,
        )
        setters = [sampler]
        path = f"decoded cache {train_cache.directory.parent} (memory-mapped)"
    tags = _dataset_tags(config, ds, len(train_rows), len(val_rows), path)
    return ImagePipeline(
        train=train,
        val=val,
        classes=ds.classes,
        labels=ds.class_labels,
        tags=tags,
        prepare_train=prepare_train,
        prepare_val=prepare_val,
        epoch_setters=setters,
        batch_size=batch_size,
        augment=config.augment,
        resize_size=config.val_resize,
        workers=config.workers,
    )


def _resident(cache: DecodedSplit, rows, batch_size, *, device, train: bool, config, rank, world_size) -> TensorBatches:
    """Copy the split's uint8 images to the device once; batches are index lookups there.

    Training shares are padded to equal lengths across ranks (and lose a final partial batch when
    compiled); evaluation shares are not padded, so no image counts twice."""
    images = torch.from_numpy(np.ascontiguousarray(cache.images[rows])).to(device).permute(0, 3, 1, 2)
    labels = torch.from_numpy(cache.labels[rows]).to(device)

    def fetch(indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return images[indices], labels[indices]

    return TensorBatches(
        fetch,
        len(rows),
        batch_size,
        shuffle=train,
        seed=config.seed,
        rank=rank,
        world_size=world_size,
        drop_last=train and config.compile,
        equal_shares=train,
        device=device,
    )
