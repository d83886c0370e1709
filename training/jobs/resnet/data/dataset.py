"""The index of an image dataset, whatever its layout on disk: class names, labelled files, splits.

Readers (tinyimagenet.py, imagefolder.py) build it; everything downstream (loaders, the decoded
cache, evaluate, compare, what a served model names its classes) reads this and never the layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from PIL import Image
from torchvision.datasets.folder import IMG_EXTENSIONS

from training.data.errors import DatasetError

IMAGE_SUFFIXES = frozenset(IMG_EXTENSIONS)  # what torchvision's ImageFolder accepts: .jpg .png .webp .tiff ...

Sample = tuple[Path, int]  # an image file and its class index


@dataclass(kw_only=True, frozen=True)
class ImageDataset:
    root: Path
    classes: list[str]  # class index -> name: the folder name (a wnid for Tiny-ImageNet), sorted
    labels: dict[str, str]  # class name -> human-readable label (words.txt where the dataset has one)
    train: list[Sample]
    val: list[Sample]
    layout: str  # "tiny-imagenet" or "imagefolder"
    val_layout: str  # "annotations" (Tiny-ImageNet's original val/) or "folders"

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def class_labels(self) -> list[str]:
        return [self.labels[c] for c in self.classes]

    def split(self, name: str) -> list[Sample]:
        if name not in ("train", "val"):
            raise DatasetError(f"unknown split {name!r}: expected train or val")
        return self.train if name == "train" else self.val


def is_image_file(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES


def read_words(path: Path, classes: list[str]) -> dict[str, str]:
    """Human-readable labels from a words.txt (`class<TAB>label` lines; Tiny-ImageNet's lists all of
    ImageNet's synsets); a class it does not name is labelled by its own name."""
    names = {c: c for c in classes}
    if not path.is_file():
        return names
    wanted = set(classes)
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        name, sep, words = line.partition("\t")
        if not sep:
            raise DatasetError(f"{path}:{lineno}: expected '<class><TAB><label>', got {line!r}")
        if name in wanted:
            names[name] = words.strip()
    return names


def open_rgb(path: Path) -> Image.Image:
    """Decode an image as RGB (grayscale, palette, CMYK and alpha images are converted); name the
    file on failure."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DatasetError(f"{path}: cannot decode image: {e}") from e
