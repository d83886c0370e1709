"""Decode a dataset split once into a memory-mapped uint8 array, instead of every epoch.

    <cache root>/<dataset name>-<split>-<key>/images.npy   N x S x S x 3 uint8 (memory-mapped)
                                            labels.npy   N int64
                                            meta.json    files (relative to the dataset), classes, key

Each image is stored as the evaluation transform sees it before normalization: resized (shorter
side) to `resize_size` and center-cropped to S = `image_size`. For Tiny-ImageNet's 64x64 images
with the defaults that is the image itself; a folder of larger photos is stored at S x S (64 px:
12 KB per image; 224 px: 147 KB), and training from the cache augments those (flip, crop), not
the full photos. The key hashes every source file's relative path, size and modification time,
the class list and both sizes, so a changed dataset is decoded again, never silently reused.
Reading is `np.load(mmap_mode="r")`: DataLoader workers share the operating system's page cache
instead of each holding a copy. The cache root is $DLOPS_CACHE_DIR, else data/cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.functional as TF  # noqa: N812 - torchvision's own alias
from PIL import Image
from torch.utils.data import Dataset
from tqdm import tqdm

from training.data.dataset import ImageDataset, Sample, open_rgb

CHUNK = 512


def cache_root() -> Path:
    """Where decoded caches (and the record of checked datasets) live: $DLOPS_CACHE_DIR, else data/cache."""
    return Path(os.environ.get("DLOPS_CACHE_DIR", "data/cache"))


def fit_image(image: Image.Image, image_size: int, resize_size: int | None = None) -> Image.Image:
    """Resize the shorter side to `resize_size` (default `image_size`), then center-crop to
    image_size x image_size: the evaluation transform's geometry (training/data/images.py)."""
    image = TF.resize(image, resize_size or image_size)
    return TF.center_crop(image, image_size)


def cache_key(dataset: ImageDataset, samples: list[Sample], image_size: int, resize_size: int | None = None) -> str:
    sizes = f"{image_size}" if resize_size in (None, image_size) else f"{image_size}/{resize_size}"
    digest = hashlib.sha256(f"{sizes}\n{','.join(dataset.classes)}\n".encode())
    for path, label in samples:
        stat = path.stat()
        digest.update(f"{path.relative_to(dataset.root)}\t{label}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def cache_dir(root: Path, dataset: ImageDataset, split: str, key: str) -> Path:
    return root / f"{dataset.root.resolve().name}-{split}-{key}"


@dataclass(kw_only=True)
class DecodedSplit:
    """A cached split: images (N, H, W, 3) uint8 memory-mapped, labels (N,), file names."""

    images: np.ndarray
    labels: np.ndarray
    files: list[str]
    directory: Path


def _decode_chunk(args: tuple[str, int, list[str], int, int | None]) -> int:
    """Worker: decode files into rows start.. of the shared array file; return how many."""
    array_path, start, files, image_size, resize_size = args
    images = np.load(array_path, mmap_mode="r+")
    for offset, file in enumerate(files):
        image = open_rgb(Path(file))
        if image.size != (image_size, image_size) or resize_size not in (None, image_size):
            image = fit_image(image, image_size, resize_size)
        images[start + offset] = np.asarray(image, dtype=np.uint8)
    images.flush()
    return len(files)


def build_cache(
    dataset: ImageDataset,
    *,
    split: str = "train",
    root: Path | None = None,
    image_size: int = 64,
    workers: int | None = None,
    resize_size: int | None = None,
) -> DecodedSplit:
    """Decode `split` of `dataset` into the cache (in parallel), unless it is there already."""
    samples = dataset.split(split)
    root = root or cache_root()
    key = cache_key(dataset, samples, image_size, resize_size)
    target = cache_dir(Path(root), dataset, split, key)
    if (target / "meta.json").is_file():
        print(f"=> {split}: cache {target} is up to date")
        return open_cache(target)
    staging = target.with_name(target.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    array_path = staging / "images.npy"
    np.lib.format.open_memmap(array_path, mode="w+", dtype=np.uint8, shape=(len(samples), image_size, image_size, 3))
    jobs = [
        (str(array_path), start, [str(p) for p, _ in samples[start : start + CHUNK]], image_size, resize_size)
        for start in range(0, len(samples), CHUNK)
    ]
    with (
        ProcessPoolExecutor(workers or os.cpu_count()) as pool,
        tqdm(total=len(samples), desc=f"decoding {split}", unit="img") as bar,
    ):
        for done in pool.map(_decode_chunk, jobs):
            bar.update(done)
    np.save(staging / "labels.npy", np.array([label for _, label in samples], dtype=np.int64))
    meta = {
        "key": key,
        "split": split,
        "dataset": str(dataset.root.resolve()),
        "classes": dataset.classes,
        "image_size": image_size,
        "resize_size": resize_size or image_size,
        "files": [str(p.relative_to(dataset.root)) for p, _ in samples],
    }
    (staging / "meta.json").write_text(json.dumps(meta), encoding="utf-8")
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)  # complete caches only: a crash leaves a .partial folder, never a bad cache
    print(f"=> {split}: decoded {len(samples)} images into {target}")
    return open_cache(target)


def open_cache(directory: Path) -> DecodedSplit:
    meta = json.loads((directory / "meta.json").read_text(encoding="utf-8"))
    images = np.load(directory / "images.npy", mmap_mode="r")
    labels = np.load(directory / "labels.npy")
    return DecodedSplit(images=images, labels=labels, files=meta["files"], directory=directory)


def find_cache(
    dataset: ImageDataset, split: str, root: Path | None = None, image_size: int = 64, resize_size: int | None = None
) -> DecodedSplit | None:
    """The cache matching the dataset as it is now on disk, or None."""
    samples = dataset.split(split)
    target = cache_dir(Path(root or cache_root()), dataset, split, cache_key(dataset, samples, image_size,
                                                                            resize_size))  # fmt: skip
    return open_cache(target) if (target / "meta.json").is_file() else None


class CachedImages(Dataset):
    """Batches of uint8 images (N, 3, H, W) and labels straight from the memory map: no PIL, no copies
    beyond the batch. DataLoader calls `__getitems__` with a whole batch of indices."""

    def __init__(self, split: DecodedSplit, indices: np.ndarray | None = None):
        self.split = split
        self.indices = np.arange(len(split.labels)) if indices is None else np.asarray(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitems__(self, positions: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        rows = np.sort(self.indices[positions])  # sorted reads are sequential on disk; order is random anyway
        images = torch.from_numpy(np.ascontiguousarray(self.split.images[rows])).permute(0, 3, 1, 2)
        return images, torch.from_numpy(self.split.labels[rows])

    def __getitem__(self, position: int) -> tuple[torch.Tensor, int]:
        images, labels = self.__getitems__([position])
        return images[0], int(labels[0])


def collate_batch(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """`CachedImages.__getitems__` already returns a batch."""
    return batch
