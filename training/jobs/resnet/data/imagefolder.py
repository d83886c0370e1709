"""A plain ImageFolder dataset, the layout PyTorch's ImageNet example reads with datasets.ImageFolder:

    root/train/<class>/**/<image>     class names: any folder names, sorted (class index = position)
    root/val/<class>/**/<image>       every class here must also be a train class
    root/words.txt                    optional: <class><TAB><human-readable label> lines

Images: every format torchvision's ImageFolder accepts (.jpg .jpeg .png .ppm .bmp .pgm .tif .tiff
.webp), any size and mode, in the class folder or any folder below it. Folders whose names start
with "." (.ipynb_checkpoints, .DS_Store's kin) are not classes. An empty class folder, or a val
class that train lacks, is a DatasetError naming the folder.
"""

from __future__ import annotations

import os
from pathlib import Path

from training.data.errors import DatasetError
from training.jobs.resnet.data.dataset import ImageDataset, Sample, is_image_file, read_words


def class_folders(split_dir: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith("."))


def _images_below(folder: Path) -> list[Path]:
    found = []
    for directory, subdirs, files in os.walk(folder, followlinks=True):
        subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
        found += [Path(directory) / f for f in sorted(files) if is_image_file(Path(directory) / f)]
    return found


def _split(split_dir: Path, index: dict[str, int], names: list[str]) -> list[Sample]:
    samples: list[Sample] = []
    for name in names:
        images = _images_below(split_dir / name)
        if not images:
            raise DatasetError(f"{split_dir / name}: class folder holds no images (accepted: "
                               ".jpg .jpeg .png .ppm .bmp .pgm .tif .tiff .webp)")  # fmt: skip
        samples += [(path, index[name]) for path in images]
    return samples


def load_imagefolder(root: Path | str) -> ImageDataset:
    root = Path(root)
    train_dir, val_dir = root / "train", root / "val"
    for split_dir in (train_dir, val_dir):
        if not split_dir.is_dir():
            raise DatasetError(f"{split_dir}: missing (an ImageFolder dataset has train/<class>/ and val/<class>/)")
    classes = class_folders(train_dir)
    if not classes:
        raise DatasetError(f"{train_dir}: holds no class folders (expected train/<class>/<images>)")
    index = {name: i for i, name in enumerate(classes)}
    val_classes = class_folders(val_dir)
    unknown = [name for name in val_classes if name not in index]
    if unknown:
        raise DatasetError(f"{val_dir / unknown[0]}: class {unknown[0]!r} is in val/ but not in train/ "
                           f"({len(unknown)} such folder(s))")  # fmt: skip
    if not val_classes:
        raise DatasetError(f"{val_dir}: holds no class folders (expected val/<class>/<images>)")
    train = _split(train_dir, index, classes)
    val = _split(val_dir, index, val_classes)
    return ImageDataset(
        root=root,
        classes=classes,
        labels=read_words(root / "words.txt", classes),
        train=train,
        val=val,
        layout="imagefolder",
        val_layout="folders",
    )
