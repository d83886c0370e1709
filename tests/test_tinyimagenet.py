"""Reading Tiny-ImageNet's on-disk layouts, and a clear error for each kind of broken dataset."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from PIL import Image

from tests.conftest import MINI_TINYIMAGENET
from training.jobs.resnet.data.dataset import open_rgb
from training.jobs.resnet.data.images import ImageFiles, eval_transform
from training.jobs.resnet.data.tinyimagenet import DatasetError, load_tinyimagenet


@pytest.fixture()
def dataset_copy(tiny_dataset: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_dataset, tmp_path / "copy"))


def annotation_labels(root: Path) -> dict[str, str]:
    lines = (root / "val" / "val_annotations.txt").read_text().splitlines()
    return {line.split("\t")[0]: line.split("\t")[1] for line in lines}


def test_original_layout_labels_come_from_annotations(tiny_dataset: Path):
    ds = load_tinyimagenet(tiny_dataset)
    assert ds.classes == sorted(ds.classes) and ds.num_classes == 4
    assert len(ds.train) == 48 and len(ds.val) == 16 and ds.val_layout == "annotations"
    expected = annotation_labels(tiny_dataset)
    assert {p.name: ds.classes[label] for p, label in ds.val} == expected
    # train labels follow the folder the image sits in
    assert all(p.parent.parent.name == ds.classes[label] for p, label in ds.train)
    assert ds.labels[ds.classes[0]].startswith("red circle")


def test_reorganized_val_folders_give_the_same_labels(dataset_copy: Path):
    original = {p.name: label for p, label in load_tinyimagenet(dataset_copy).val}
    val = dataset_copy / "val"
    for name, wnid in annotation_labels(dataset_copy).items():
        (val / wnid).mkdir(exist_ok=True)
        (val / "images" / name).rename(val / wnid / name)
    (val / "images").rmdir()
    (val / "val_annotations.txt").unlink()
    ds = load_tinyimagenet(dataset_copy)
    assert ds.val_layout == "folders"
    assert {p.name: label for p, label in ds.val} == original


def test_grayscale_jpegs_become_rgb(tiny_dataset: Path):
    ds = load_tinyimagenet(tiny_dataset)
    modes = {Image.open(p).mode for p, _ in ds.train}
    assert "L" in modes, "the synthetic dataset should include grayscale JPEGs"
    gray = next(p for p, _ in ds.train if Image.open(p).mode == "L")
    assert open_rgb(gray).mode == "RGB"
    image, _ = ImageFiles([(gray, 0)], eval_transform(64))[0]
    assert tuple(image.shape) == (3, 64, 64)


def _edit(path: Path, old: str, new: str) -> None:
    path.write_text(path.read_text().replace(old, new, 1))


@pytest.mark.parametrize(
    ("breakage", "message"),
    [
        (lambda r: (r / "val" / "val_annotations.txt").unlink(), r"val_annotations\.txt: missing"),
        (lambda r: _edit(r / "val" / "val_annotations.txt", "\t", " "), None),  # spaces are accepted too
        (lambda r: (r / "val" / "val_annotations.txt").write_text("val_0.JPEG\n"), r"val_annotations\.txt:1: expected"),
        (
            lambda r: _edit(r / "val" / "val_annotations.txt", "n9000000", "n9999999"),
            r"val_annotations\.txt:1: wnid 'n9999999",
        ),
        (
            lambda r: (r / "val" / "images" / "val_0.JPEG").unlink(),
            r"val_annotations\.txt:1: image .*val_0\.JPEG does not exist",
        ),
        (lambda r: (r / "wnids.txt").unlink(), r"wnids\.txt: missing"),
        (lambda r: _edit(r / "wnids.txt", "n90000001", "cat"), r"wnids\.txt:2: 'cat' is not a WordNet id"),
        (lambda r: shutil.rmtree(r / "train" / "n90000002"), r"train/n90000002: missing"),
        (lambda r: (r / "train" / "n12345678").mkdir(), r"train/n12345678: folder name .* is not a wnid"),
        (lambda r: _edit(r / "words.txt", "\t", " "), r"words\.txt:1: expected"),
    ],
)
def test_broken_dataset_names_the_file_and_line(dataset_copy: Path, breakage, message):
    breakage(dataset_copy)
    if message is None:
        assert len(load_tinyimagenet(dataset_copy).val) == 16
        return
    with pytest.raises(DatasetError, match=message):
        load_tinyimagenet(dataset_copy)


def test_unreadable_image_names_the_file(dataset_copy: Path):
    ds = load_tinyimagenet(dataset_copy)
    broken = ds.train[5][0]
    broken.write_bytes(b"not a jpeg at all")
    with pytest.raises(DatasetError, match=rf"{broken.name}: cannot decode image"):
        ImageFiles(ds.train, eval_transform(64))[5]


@pytest.mark.skipif(not MINI_TINYIMAGENET.is_dir(), reason=f"real data not found at {MINI_TINYIMAGENET}")
def test_real_mini_tinyimagenet_layout():
    ds = load_tinyimagenet(MINI_TINYIMAGENET)
    assert ds.num_classes == 200 and len(ds.train) == 10_000 and len(ds.val) == 2_000
    expected = annotation_labels(MINI_TINYIMAGENET)
    assert {p.name: ds.classes[label] for p, label in ds.val} == expected
    assert ds.labels["n01443537"] == "goldfish, Carassius auratus"
