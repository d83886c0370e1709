"""Data that needs no download: random tensors (--dummy) and a learnable dataset on disk.

`write_synthetic_tinyimagenet` writes Tiny-ImageNet's exact layout (wnids.txt, words.txt,
train/<wnid>/images, val/images + val_annotations.txt) with one shape-and-colour pair per class,
drawn at random positions and sizes over noise, so a short CPU run shows accuracy rising.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from torch.utils.data import Dataset
from tqdm import tqdm

SHAPES = ("circle", "square", "triangle", "cross", "ring", "diamond", "hbar", "vbar")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 210, 40),
    "magenta": (200, 50, 200),
    "cyan": (40, 200, 210),
    "orange": (240, 140, 30),
    "white": (245, 245, 245),
}
GRAYSCALE_EVERY = 13  # a few grayscale JPEGs, as in the real dataset


class RandomImages(Dataset):
    """Deterministic random normalized tensors and labels: throughput runs with no files."""

    def __init__(self, size: int, num_classes: int, image_size: int, seed: int = 0):
        self.size, self.num_classes, self.image_size, self.seed = size, num_classes, image_size, seed

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        image = torch.randn(3, self.image_size, self.image_size, generator=g)
        return image, int(torch.randint(self.num_classes, (1,), generator=g))


def synthetic_wnid(i: int) -> str:
    return f"n9{i:07d}"


def class_design(i: int) -> tuple[str, str]:
    """(shape, colour) of class i; distinct for the first len(SHAPES) * len(COLOURS) classes."""
    colours = list(COLOURS)
    return SHAPES[i % len(SHAPES)], colours[(i + i // len(SHAPES)) % len(colours)]


def draw_example(i: int, rng: random.Random, size: int = 64) -> tuple[Image.Image, tuple[int, int, int, int]]:
    """One image of class i and the shape's bounding box."""
    shape, colour = class_design(i)
    noise = bytes(rng.randrange(0, 110) for _ in range(size * size * 3))
    image = Image.frombytes("RGB", (size, size), noise)
    draw = ImageDraw.Draw(image)
    r = rng.randint(size // 6, size // 3)
    cx, cy = rng.randint(r, size - r), rng.randint(r, size - r)
    box = (cx - r, cy - r, cx + r, cy + r)
    fill = tuple(min(255, max(0, c + rng.randint(-25, 25))) for c in COLOURS[colour])
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    elif shape == "cross":
        draw.rectangle((cx - r, cy - r // 3, cx + r, cy + r // 3), fill=fill)
        draw.rectangle((cx - r // 3, cy - r, cx + r // 3, cy + r), fill=fill)
    elif shape == "ring":
        draw.ellipse(box, outline=fill, width=max(3, r // 3))
    elif shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
    elif shape == "hbar":
        draw.rectangle((cx - r, cy - r // 4, cx + r, cy + r // 4), fill=fill)
    else:
        draw.rectangle((cx - r // 4, cy - r, cx + r // 4, cy + r), fill=fill)
    return image, box


def _save(image: Image.Image, path: Path, serial: int) -> None:
    if serial % GRAYSCALE_EVERY == GRAYSCALE_EVERY - 1:
        image = image.convert("L")
    image.save(path, "JPEG", quality=90)


def write_synthetic_tinyimagenet(
    out: Path | str,
    *,
    num_classes: int = 10,
    train_per_class: int = 100,
    val_per_class: int = 20,
    image_size: int = 64,
    seed: int = 0,
    progress: bool = True,
) -> Path:
    """Write a learnable dataset in Tiny-ImageNet's layout under `out`; return `out`."""
    out = Path(out)
    if num_classes < 1 or train_per_class < 1 or val_per_class < 1:
        raise ValueError("num_classes, train_per_class and val_per_class must all be at least 1")
    rng = random.Random(seed)
    wnids = [synthetic_wnid(i) for i in range(num_classes)]
    (out / "val" / "images").mkdir(parents=True, exist_ok=True)
    (out / "wnids.txt").write_text("".join(f"{w}\n" for w in wnids), encoding="utf-8")
    # Like the real words.txt, list more synsets than the dataset uses.
    words = [f"{w}\t{' '.join(reversed(class_design(i)))}, synthetic class {i}" for i, w in enumerate(wnids)]
    words.append(f"{synthetic_wnid(num_classes + 1)}\tunused synset")
    (out / "words.txt").write_text("\n".join(words) + "\n", encoding="utf-8")

    total = num_classes * (train_per_class + val_per_class)
    bar = tqdm(total=total, desc="synthesizing", unit="img", disable=not progress)
    for i, wnid in enumerate(wnids):
        folder = out / "train" / wnid / "images"
        folder.mkdir(parents=True, exist_ok=True)
        for k in range(train_per_class):
            image, _ = draw_example(i, rng, image_size)
            _save(image, folder / f"{wnid}_{k}.JPEG", i * train_per_class + k)
            bar.update()
    lines = []
    for k in range(num_classes * val_per_class):
        i = k % num_classes
        image, box = draw_example(i, rng, image_size)
        name = f"val_{k}.JPEG"
        _save(image, out / "val" / "images" / name, k)
        lines.append(f"{name}\t{wnids[i]}\t{box[0]}\t{box[1]}\t{box[2]}\t{box[3]}\n")
        bar.update()
    bar.close()
    (out / "val" / "val_annotations.txt").write_text("".join(lines), encoding="utf-8")
    return out


# A small grammar for a learnable corpus with WikiText's look: headings, blank lines, non-ASCII words.
