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

Processes that ask for the same missing cache at the same moment (two terminals, an array job, a
sweep's workers, nodes sharing a folder) build it once: the first takes `<cache>.lock` with
flock(2) and decodes into a folder of its own (`<cache>.partial-<host>-<pid>`), the others wait on
the lock, saying who holds it, and then open the finished cache. The kernel (or, over NFS, the lock
manager once the client's lease ends) releases the lock of a builder that dies, and its half-built
folder is never taken for a cache: only a complete folder is renamed into place, with meta.json in
it. On a filesystem without locks (Lustre mounted without `-o flock`, some FUSE mounts) each
process builds a private copy and the first rename wins; a mount whose locks are local only (NFSv3
with `nolock`) builds at most once per machine the same way. Neither case can yield a bad cache.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
import socket
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.functional as TF  # noqa: N812 - torchvision's own alias
from PIL import Image
from torch.utils.data import Dataset
from tqdm import tqdm

from serving import environment
from training.jobs.resnet.data.dataset import ImageDataset, Sample, open_rgb

CHUNK = 512
META = "meta.json"  # written last, inside the staging folder: a cache folder with it is complete
# flock(2) errors that mean "this filesystem has no locks", not "someone else holds it"
NO_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


def cache_root() -> Path:
    """Where decoded caches (and the record of checked datasets) live: $DLOPS_CACHE_DIR, else data/cache."""
    return Path(os.environ.get(environment.CACHE_DIR, "data/cache"))


def fit_image(image: Image.Image, image_size: int, resize_size: int | None = None) -> Image.Image:
    """Resize the shorter side to `resize_size` (default `image_size`), then center-crop to
    image_size x image_size: the evaluation transform's geometry (training/jobs/resnet/data/images.py)."""
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
    """Decode `split` of `dataset` into the cache (in parallel), unless it is there already or another
    process is building it (then wait for that one and open its cache)."""
    samples = dataset.split(split)
    key = cache_key(dataset, samples, image_size, resize_size)
    target = cache_dir(Path(root or cache_root()), dataset, split, key)
    if is_complete(target):
        print(f"=> {split}: cache {target} is up to date")
        return open_cache(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with build_lock(target, split=split) as locked:
        if is_complete(target):
            print(f"=> {split}: cache {target} was built by another process")
            return open_cache(target)
        if locked:  # whatever else is here was left by a builder that died holding this lock
            remove_leftovers(target)
        staging = target.with_name(f"{target.name}.partial-{socket.gethostname()}-{os.getpid()}")
        shutil.rmtree(staging, ignore_errors=True)
        print(f"=> {split}: decoding {len(samples)} images into {target}", flush=True)
        try:
            _decode(samples, staging=staging, image_size=image_size, resize_size=resize_size, workers=workers,
                    split=split)  # fmt: skip
            _write_meta(staging, dataset=dataset, samples=samples, split=split, key=key, image_size=image_size,
                        resize_size=resize_size)  # fmt: skip
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)  # an interrupted build leaves nothing behind
            raise
        publish(staging, target)
    print(f"=> {split}: decoded {len(samples)} images into {target}")
    return open_cache(target)


def is_complete(directory: Path) -> bool:
    return (directory / META).is_file()


@contextmanager
def build_lock(target: Path, *, split: str) -> Iterator[bool]:
    """Hold the right to build `target`: yields True once held (waiting, with a line saying for whom,
    while another process holds it), False where the filesystem offers no locks."""
    path = target.with_name(target.name + ".lock")
    with open(path, "a+", encoding="utf-8") as handle:  # closing it releases the lock
        locked = _lock(handle, path=path, split=split)
        if locked:
            handle.seek(0)
            handle.truncate()
            handle.write(f"process {os.getpid()} on {socket.gethostname()}\n")
            handle.flush()
        yield locked


def _lock(handle, *, path: Path, split: str) -> bool:
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        print(f"=> {split}: {holder} is building this cache; waiting for it ({path})", flush=True)
        fcntl.flock(handle, fcntl.LOCK_EX)
        return True
    except OSError as error:
        if error.errno not in NO_LOCKS:
            raise
        print(f"=> {split}: {path.parent} offers no file locks ({error.strerror}): building a private copy, "
              "the first one finished is kept", flush=True)  # fmt: skip
        return False


def remove_leftovers(target: Path) -> None:
    """Half-built folders of `target` (and a folder of that name without meta.json)."""
    for leftover in target.parent.glob(f"{target.name}.partial*"):
        shutil.rmtree(leftover, ignore_errors=True)
    if target.exists():
        shutil.rmtree(target, ignore_errors=True)


def publish(staging: Path, target: Path) -> None:
    """Rename the complete `staging` folder into place; where another builder was first (no locks on
    this filesystem), keep theirs and drop ours."""
    try:
        staging.rename(target)
    except OSError as error:
        if error.errno not in (errno.EEXIST, errno.ENOTEMPTY) or not is_complete(target):
            raise
        shutil.rmtree(staging, ignore_errors=True)


def _decode(samples: list[Sample], *, staging: Path, image_size: int, resize_size: int | None, workers: int | None,
            split: str) -> None:  # fmt: skip
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


def _write_meta(staging: Path, *, dataset: ImageDataset, samples: list[Sample], split: str, key: str, image_size: int,
                resize_size: int | None) -> None:  # fmt: skip
    meta = {
        "key": key,
        "split": split,
        "dataset": str(dataset.root.resolve()),
        "classes": dataset.classes,
        "image_size": image_size,
        "resize_size": resize_size or image_size,
        "files": [str(p.relative_to(dataset.root)) for p, _ in samples],
    }
    (staging / META).write_text(json.dumps(meta), encoding="utf-8")


def open_cache(directory: Path) -> DecodedSplit:
    meta = json.loads((directory / META).read_text(encoding="utf-8"))
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
    return open_cache(target) if is_complete(target) else None


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
