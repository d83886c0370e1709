"""Tiny-ImageNet read in its original on-disk layout, no reorganizing by hand.

    root/wnids.txt                      one class id per line; class index = position in sorted order
    root/words.txt                      wnid <TAB> human-readable names (all of ImageNet's synsets)
    root/train/<wnid>/images/*.JPEG     (or train/<wnid>/*.JPEG)
    root/val/images/*.JPEG + root/val/val_annotations.txt   (file <TAB> wnid <TAB> box)
    or root/val/<wnid>/[images/]*.JPEG  (a val/ already reorganized into class folders)

Every problem is a DatasetError that names the file (and line) at fault. The layout is detected
by its wnids.txt (training/jobs/resnet/data/index.py); a plain folder of class folders is imagefolder.py's.
"""

from __future__ import annotations

import re
from pathlib import Path

from training.data.errors import DatasetError
from training.jobs.resnet.data.dataset import ImageDataset, Sample, is_image_file, read_words

WNID_PATTERN = re.compile(r"^n\d{8}$")


def load_tinyimagenet(root: Path | str) -> ImageDataset:
    """Index the dataset at `root` (file lists only; images are decoded later, on demand)."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: dataset folder does not exist")
    wnids = read_wnids(root / "wnids.txt")
    index = {wnid: i for i, wnid in enumerate(wnids)}
    labels = read_words(root / "words.txt", wnids)
    train = list_train(root / "train", index)
    val, layout = list_val(root / "val", index)
    return ImageDataset(
        root=root, classes=wnids, labels=labels, train=train, val=val, layout="tiny-imagenet", val_layout=layout
    )


def read_wnids(path: Path) -> list[str]:
    if not path.is_file():
        raise DatasetError(f"{path}: missing (it lists the class ids, one per line)")
    seen: dict[str, int] = {}
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        wnid = line.strip()
        if not wnid:
            continue
        if not WNID_PATTERN.match(wnid):
            raise DatasetError(f"{path}:{lineno}: {wnid!r} is not a WordNet id like n01443537")
        if wnid in seen:
            raise DatasetError(f"{path}:{lineno}: {wnid} repeats line {seen[wnid]}")
        seen[wnid] = lineno
    if not seen:
        raise DatasetError(f"{path}: lists no class ids")
    return sorted(seen)


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if is_image_file(p))


def _class_folders(split_dir: Path, index: dict[str, int]) -> list[Sample]:
    """Images in <split>/<wnid>/images/ or <split>/<wnid>/, for every wnid of wnids.txt."""
    for folder in sorted(p for p in split_dir.iterdir() if p.is_dir()):
        if folder.name not in index:
            raise DatasetError(f"{folder}: folder name {folder.name!r} is not a wnid listed in wnids.txt")
    samples: list[Sample] = []
    for wnid, label in index.items():
        folder = split_dir / wnid
        if not folder.is_dir():
            raise DatasetError(f"{folder}: missing (class {wnid} is listed in wnids.txt)")
        images_dir = folder / "images" if (folder / "images").is_dir() else folder
        images = _images_in(images_dir)
        if not images:
            raise DatasetError(f"{images_dir}: holds no images")
        samples.extend((p, label) for p in images)
    return samples


def list_train(train_dir: Path, index: dict[str, int]) -> list[Sample]:
    if not train_dir.is_dir():
        raise DatasetError(f"{train_dir}: missing (expected train/<wnid>/images/*.JPEG)")
    return _class_folders(train_dir, index)


def list_val(val_dir: Path, index: dict[str, int]) -> tuple[list[Sample], str]:
    if not val_dir.is_dir():
        raise DatasetError(f"{val_dir}: missing (expected val/images/ with val_annotations.txt)")
    annotations = val_dir / "val_annotations.txt"
    if annotations.exists() or (val_dir / "images").is_dir():
        return read_val_annotations(annotations, val_dir / "images", index), "annotations"
    return _class_folders(val_dir, index), "folders"


def read_val_annotations(path: Path, images_dir: Path, index: dict[str, int]) -> list[Sample]:
    """Label val images from `val_annotations.txt`: file <TAB> wnid [<TAB> x0 y0 x1 y1]."""
    if not path.is_file():
        raise DatasetError(f"{path}: missing (it labels the images in {images_dir})")
    samples: list[Sample] = []
    seen: dict[str, int] = {}
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split()
        if len(fields) not in (2, 6):
            raise DatasetError(f"{path}:{lineno}: expected '<file> <wnid> [x0 y0 x1 y1]', got {line!r}")
        name, wnid = fields[0], fields[1]
        if wnid not in index:
            raise DatasetError(f"{path}:{lineno}: wnid {wnid!r} is not listed in wnids.txt")
        if name in seen:
            raise DatasetError(f"{path}:{lineno}: {name} was already labelled on line {seen[name]}")
        image = images_dir / name
        if not image.is_file():
            raise DatasetError(f"{path}:{lineno}: image {image} does not exist")
        seen[name] = lineno
        samples.append((image, index[wnid]))
    if not samples:
        raise DatasetError(f"{path}: labels no images")
    return sorted(samples)
