"""A user's own images in a plain ImageFolder: any folder names, every format torchvision reads, any
size and mode; trained, evaluated, packaged, cached and answered over HTTP by folder name; and each
broken layout refused, naming the folder or file, before an MLflow run exists."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import numpy as np
import pytest

from release.deploy import serve
from serving.server import ServeOptions, stop
from tests.conftest import cli_error, latest_run, run_cli
from training.jobs.resnet.data.cache import build_cache
from training.jobs.resnet.data.index import load_image_dataset
from training.jobs.resnet.data.synthetic import draw_example

CLASSES = ["ants", "bees", "tête de mort", "Ölkäfer"]  # sorted as ImageFolder sorts them: by code point
FORMATS = [("PNG", ".png"), ("WEBP", ".webp"), ("JPEG", ".jpg"), ("BMP", ".bmp")]
SIZES = [(64, 64), (90, 70), (48, 80), (120, 96)]
FAST = ["-b", "8", "-j", "0", "-p", "0", "--lr", "0.02", "--epochs", "1"]


def write_imagefolder(root: Path, per_class: tuple[int, int] = (8, 3)) -> Path:
    """train/<class>/ and val/<class>/ with drawn shapes (one per class) in mixed formats, sizes and modes."""
    rng = random.Random(0)
    for split, count in zip(("train", "val"), per_class, strict=True):
        for c, name in enumerate(CLASSES):
            folder = root / split / name / ("nested" if c == 1 else "")  # images below the class folder count too
            folder.mkdir(parents=True, exist_ok=True)
            for k in range(count):
                fmt, suffix = FORMATS[(c + k) % len(FORMATS)]
                width, height = SIZES[k % len(SIZES)]
                image, _ = draw_example(c, rng, size=max(width, height))
                image = image.crop((0, 0, width, height))
                image = image.convert("L") if k % 3 == 2 else image  # grayscale ones
                image = image.convert("RGBA") if fmt == "PNG" and k % 2 else image
                image.save(folder / f"img {k}{suffix}", fmt)
    (root / "words.txt").write_text("ants\tformicidae\nbees\tapis mellifera\n", encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def folder(module_tmp) -> Path:
    return write_imagefolder(module_tmp.mktemp("imagefolder") / "photos")


def test_the_index_reads_folder_names_formats_and_labels(folder):
    ds = load_image_dataset(folder)
    assert ds.layout == "imagefolder" and ds.classes == sorted(CLASSES) and ds.classes == CLASSES
    assert len(ds.train) == 32 and len(ds.val) == 12
    assert {p.suffix for p, _ in ds.train} == {s for _, s in FORMATS}
    assert ds.labels["ants"] == "formicidae" and ds.labels["tête de mort"] == "tête de mort"
    assert all(CLASSES[label] in p.parts for p, label in ds.train + ds.val)


def test_a_folder_of_photos_trains_evaluates_packages_and_answers_by_folder_name(folder, tmp_path, client):
    output = run_cli("train", "resnet", folder, *FAST, "--out-dir", tmp_path, "--experiment", "test-folder",
                     "--registered-model", "test-folder").output  # fmt: skip
    assert "32 train / 12 val images, 4 classes" in output
    run = latest_run(client, "test-folder", job="train-resnet")
    params, tags = run.data.params, run.data.tags
    # the ImageNet example's transforms for photos of any size: random-resized crop, resize 73 + crop 64
    assert params["augment"] == "random-resized-crop" and params["val_resize"] == "73"
    assert tags["dataset_layout"] == "imagefolder"
    checkpoint = tmp_path / run.info.run_id / "best.pt"
    output = run_cli("evaluate", "--checkpoint", checkpoint, folder, "-b", "8", "-j", "0").output
    assert " * Acc@1" in output
    options = ServeOptions.on_free_ports(model_store=tmp_path / "store", state_dir=tmp_path / "ts", amp="off")
    server = serve(options, ["models:/test-folder/latest"])
    try:
        image = next(p for p, label in load_image_dataset(folder).val if p.suffix == ".webp")
        answer = server.predict_file("resnet", image, {"X-TopK": "4"})
        assert answer.ok, answer
        assert sorted(a["class"] for a in answer.data) == sorted(CLASSES)
        labels = {a["class"]: a["label"] for a in answer.data}
        assert labels["bees"] == "apis mellifera" and labels["Ölkäfer"] == "Ölkäfer"
    finally:
        stop(options.state_dir)


def test_the_decoded_cache_stores_resized_center_crops(folder, tmp_path):
    ds = load_image_dataset(folder)
    cached = build_cache(ds, split="val", root=tmp_path / "cache", image_size=32, workers=1, resize_size=37)
    assert cached.images.shape == (12, 32, 32, 3) and cached.images.dtype == np.uint8
    assert cached.files == [str(p.relative_to(folder)) for p, _ in ds.val]
    run_cli("data", "cache", folder, "--cache-dir", tmp_path / "cli-cache", "--image-size", "32")
    (meta,) = (tmp_path / "cli-cache").glob("photos-train-*/meta.json")
    assert '"resize_size": 37' in meta.read_text()  # 32 / 0.875, as the training run would resolve it


def corrupt(root: Path) -> Path:
    bad = root / "train" / "bees" / "nested" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return bad


@pytest.mark.parametrize(
    ("breaking", "message"),
    [
        (
            lambda r: shutil.rmtree(r / "train" / "ants") or (r / "train" / "ants").mkdir(),
            "train/ants: class folder holds no images",
        ),  # fmt: skip
        (
            lambda r: (
                (r / "val" / "wasps").mkdir() or shutil.copy(next((r / "val" / "ants").iterdir()), r / "val" / "wasps")
            ),
            "val/wasps: class 'wasps' is in val/ but not in train/",
        ),  # fmt: skip
        (lambda r: corrupt(r), "broken.png (UnidentifiedImageError"),
        (lambda r: shutil.rmtree(r / "val"), "val: missing"),
    ],
)
def test_each_broken_layout_is_refused_before_a_run_exists(folder, tmp_path, client, breaking, message):
    data = Path(shutil.copytree(folder, tmp_path / "photos"))
    breaking(data)
    experiment = client.get_experiment_by_name("test-folder-broken")
    before = len(client.search_runs([experiment.experiment_id])) if experiment else 0
    output = cli_error("train", "resnet", data, *FAST, "--out-dir", tmp_path, "--experiment", "test-folder-broken")
    assert message in output, output
    experiment = client.get_experiment_by_name("test-folder-broken")
    assert (len(client.search_runs([experiment.experiment_id])) if experiment else 0) == before
