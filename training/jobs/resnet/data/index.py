"""Open an image dataset by its layout, detected, and check every image can be read before training.

    load_image_dataset(root)   root/wnids.txt       -> Tiny-ImageNet's original layout (tinyimagenet.py)
                               root/train/<class>/  -> a plain ImageFolder (imagefolder.py)

Every image's header is read once (PIL identifies the format and size) so that a file that is not
an image fails now, naming it, rather than an hour into training. The check is remembered per
state of the dataset (every file's path, size and modification time) under the decoded-cache
folder, so later runs on an unchanged dataset skip it.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from PIL import Image

from training.data.errors import DatasetError
from training.jobs.resnet.data.cache import cache_root
from training.jobs.resnet.data.dataset import ImageDataset
from training.jobs.resnet.data.imagefolder import load_imagefolder
from training.jobs.resnet.data.tinyimagenet import load_tinyimagenet

CHUNK = 1000


def detect_layout(root: Path) -> str:
    if not root.is_dir():
        raise DatasetError(f"{root}: dataset folder does not exist")
    if (root / "wnids.txt").is_file():
        return "tiny-imagenet"
    if (root / "train").is_dir():
        return "imagefolder"
    raise DatasetError(f"{root}: neither Tiny-ImageNet's layout (wnids.txt, train/<wnid>/images/, val/) nor an "
                       "ImageFolder (train/<class>/<images>, val/<class>/<images>)")  # fmt: skip


def load_image_dataset(root: Path | str, *, verify: bool = True) -> ImageDataset:
    """Index the dataset at `root` in whichever layout it has; with `verify`, check every image."""
    root = Path(root)
    layout = detect_layout(root)
    dataset = load_tinyimagenet(root) if layout == "tiny-imagenet" else load_imagefolder(root)
    if verify:
        verify_images(dataset)
    return dataset


def _unreadable(paths: list[str]) -> list[str]:
    """Worker: the paths whose header PIL cannot read, with the reason."""
    bad = []
    for path in paths:
        try:
            with Image.open(path) as image:
                image.size  # noqa: B018 - reading the header is the check
        except Exception as e:  # noqa: BLE001 - PIL raises many kinds for a file that is not an image
            bad.append(f"{path} ({type(e).__name__}: {e})")
    return bad


def dataset_signature(dataset: ImageDataset) -> str:
    digest = hashlib.sha256(f"{dataset.layout}\n{','.join(dataset.classes)}\n".encode())
    for path, label in dataset.train + dataset.val:
        stat = path.stat()
        digest.update(f"{path.relative_to(dataset.root)}\t{label}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:24]


def verify_images(dataset: ImageDataset, workers: int | None = None) -> None:
    """Raise DatasetError naming the files that are not images PIL can read (once per dataset state)."""
    marker = cache_root() / "verified" / f"{dataset.root.resolve().name}-{dataset_signature(dataset)}"
    if marker.is_file():
        return
    paths = [str(p) for p, _ in dataset.train + dataset.val]
    chunks = [paths[i : i + CHUNK] for i in range(0, len(paths), CHUNK)]
    if len(chunks) > 1:
        with ProcessPoolExecutor(workers or os.cpu_count()) as pool:
            bad = [b for found in pool.map(_unreadable, chunks) for b in found]
    else:
        bad = _unreadable(paths)
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise DatasetError(f"cannot read {len(bad)} image(s): {'; '.join(bad[:3])}{more}")
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(f"{len(paths)} images of {dataset.root.resolve()} read\n", encoding="utf-8")
