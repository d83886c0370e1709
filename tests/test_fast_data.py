"""The decoded cache, batch-level augmentation (the GPU code, run on CPU tensors) and the fast recipe."""

from __future__ import annotations

import copy
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import latest_run, run_cli
from training.checkpoint import load_checkpoint
from training.jobs.resnet.classifier import classifier_from_checkpoint
from training.jobs.resnet.data.batches import BatchTransform, TensorBatches, random_crop, random_flip
from training.jobs.resnet.data.cache import CachedImages, build_cache, collate_batch, find_cache
from training.jobs.resnet.data.dataset import open_rgb
from training.jobs.resnet.data.images import make_loader
from training.jobs.resnet.data.pipeline import JPEG_WORKERS
from training.jobs.resnet.data.tinyimagenet import load_tinyimagenet
from training.jobs.resnet.recipes import RECIPES
from training.jobs.resnet.tiny_maps import TinyMapConv2d, use_matmul_for_tiny_maps


@pytest.fixture()
def dataset(tiny_dataset: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_dataset, tmp_path / "data"))


def test_cache_round_trips_images_labels_and_file_names(dataset, tmp_path):
    cached = build_cache(load_tinyimagenet(dataset), split="val", root=tmp_path / "cache", workers=2)
    samples = load_tinyimagenet(dataset).val
    assert cached.images.shape == (16, 64, 64, 3) and cached.images.dtype == np.uint8
    assert isinstance(cached.images, np.memmap), "the cache must be memory-mapped, not loaded"
    for i, (path, label) in enumerate(samples):
        assert np.array_equal(cached.images[i], np.asarray(open_rgb(path)))
        assert cached.labels[i] == label and cached.files[i] == str(path.relative_to(dataset))


def test_editing_or_adding_a_file_invalidates_the_cache(dataset, tmp_path):
    root = tmp_path / "cache"
    first = build_cache(load_tinyimagenet(dataset), split="train", root=root, workers=1).directory
    assert find_cache(load_tinyimagenet(dataset), "train", root).directory == first
    image = next((dataset / "train").rglob("*.JPEG"))
    image.write_bytes(image.read_bytes())  # same bytes, new modification time: an edit
    os.utime(image, ns=(image.stat().st_atime_ns, image.stat().st_mtime_ns + 10**9))
    assert find_cache(load_tinyimagenet(dataset), "train", root) is None
    second = build_cache(load_tinyimagenet(dataset), split="train", root=root, workers=1).directory
    assert second != first
    new = image.with_name("n90000000_extra.JPEG")
    shutil.copy(image, new)
    assert find_cache(load_tinyimagenet(dataset), "train", root) is None
    assert len(build_cache(load_tinyimagenet(dataset), split="train", root=root, workers=1).labels) == 49


def test_dataloader_workers_read_batches_from_the_memory_map(dataset, tmp_path):
    cached = build_cache(load_tinyimagenet(dataset), split="train", root=tmp_path / "cache", workers=1)
    loader = make_loader(CachedImages(cached), 10, 2, device=torch.device("cpu"), collate_fn=collate_batch)
    seen = []
    for images, labels in loader:
        assert images.dtype == torch.uint8 and images.shape[1:] == (3, 64, 64)
        for image, label in zip(images, labels, strict=True):
            row = int(np.flatnonzero((cached.images == image.permute(1, 2, 0).numpy()).all(axis=(1, 2, 3)))[0])
            assert cached.labels[row] == label  # labels stay with their images
            seen.append(row)
    assert sorted(seen) == list(range(48))


def test_batch_augmentation_keeps_shapes_dtypes_and_labels():
    torch.manual_seed(0)
    images = torch.arange(4 * 3 * 8 * 8, dtype=torch.float32).view(4, 3, 8, 8)
    cropped = random_crop(images, padding=2)
    assert cropped.shape == images.shape and cropped.dtype == images.dtype
    for i in range(4):  # each crop is a window of its own reflect-padded image
        assert _is_window(cropped[i], images[i], padding=2)
    flipped = random_flip(images)
    for i in range(4):
        assert torch.equal(flipped[i], images[i]) or torch.equal(flipped[i], images[i].flip(2))
    # a seeded batch of 32 distinct, asymmetric images: some must be flipped, some not, most shifted
    torch.manual_seed(1)
    batch = torch.rand(32, 3, 16, 16)
    out = BatchTransform("flip-crop", (0.0,) * 3, (1 / 255,) * 3, train=True)((batch * 255).round().to(torch.uint8))
    source = (batch * 255).round()
    was_flipped = [not torch.equal(out[i], source[i]) and _is_window(out[i].flip(2), source[i]) for i in range(32)]
    as_is = [torch.equal(out[i], source[i]) for i in range(32)]
    assert 0 < sum(was_flipped) < 32, "random_flip flipped none or all of 32 images"
    assert sum(as_is) < 8, f"{sum(as_is)} of 32 images came out neither cropped nor flipped"
    assert all(_is_window(o, s) or _is_window(o.flip(2), s) for o, s in zip(out, source, strict=True))
    transform = BatchTransform("flip-crop", (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), train=True)
    out = transform(torch.full((4, 3, 8, 8), 255, dtype=torch.uint8))
    assert out.dtype == torch.float32 and torch.allclose(out, torch.full_like(out, 2.0))
    with pytest.raises(ValueError, match="needs the image-file loader"):
        BatchTransform("trivialaugment", (0.5,) * 3, (0.25,) * 3, train=True)


def _is_window(image: torch.Tensor, source: torch.Tensor, padding: int = 1) -> bool:
    """Whether `image` is a crop of `source` reflect-padded by `padding` (16x16 images: 16 // 16 = 1)."""
    padded = torch.nn.functional.pad(source[None], (padding,) * 4, mode="reflect")[0]
    size = source.size(-1)
    return any(torch.equal(image, padded[:, y : y + size, x : x + size])
               for y in range(2 * padding + 1) for x in range(2 * padding + 1))  # fmt: skip


def test_tensor_batches_cover_each_sample_once_per_epoch_and_shard_by_rank():
    images, labels = torch.arange(10).view(10, 1), torch.arange(10) * 10
    batches = TensorBatches(lambda i: (images[i], labels[i]), 10, 3, shuffle=True, seed=1)
    epoch1 = torch.cat([x for x, _ in batches]).flatten().tolist()
    batches.set_epoch(1)
    epoch2 = torch.cat([x for x, _ in batches]).flatten().tolist()
    assert sorted(epoch1) == sorted(epoch2) == list(range(10)) and epoch1 != epoch2 and len(batches) == 4
    assert all(torch.equal(y, x.flatten() * 10) for x, y in batches)
    shards = [
        TensorBatches(lambda i: (images[i], labels[i]), 10, 3, shuffle=True, seed=1, rank=rank, world_size=2)
        for rank in (0, 1)
    ]
    both = [v for s in shards for x, _ in s for v in x.flatten().tolist()]
    assert sorted(both) == list(range(10))


def test_fast_recipe_trains_from_the_cache_and_logs_every_resolved_value(dataset, tmp_path, client):
    run_cli("train", "resnet", dataset, "--recipe", "fast", "--epochs", "1", "-b", "16", "-j", "0", "-p", "0",
            "--data-cache", tmp_path / "cache", "--out-dir", tmp_path, "--experiment", "test-fast")  # fmt: skip
    run = latest_run(client, "test-fast")
    params = run.data.params
    for name, value in RECIPES["fast"][params["recipe_device_class"]].items():
        if name == "amp":  # auto, resolved for this CPU
            assert params["amp_requested"] == "auto" and params["amp"] in ("off", "bf16")
        elif name not in ("epochs", "batch_size"):  # given explicitly above
            assert params[name] == str(value), name
    assert params["recipe"] == "fast" and params["epochs"] == "1" and params["batch_size"] == "16"
    assert params["cpu_capability"] and "cpu_avx512_bf16" in params
    assert "decoded cache" in run.data.tags["data_path"]
    assert run.data.metrics["time/images_per_second"] > 0


# --- the CPU's choices: tiny maps as matrix products, the cache built when missing, loader processes ---


TINY = [(8, 2, 3, 1, 1, False), (8, 1, 3, 1, 1, False), (8, 2, 1, 1, 0, True), (8, 2, 3, 2, 1, True)]


@pytest.mark.parametrize(("channels", "size", "kernel", "stride", "padding", "bias"), TINY)
def test_a_tiny_map_convolution_as_a_matrix_product_equals_the_library_convolution(channels, size, kernel, stride,
                                                                                    padding, bias):  # fmt: skip
    torch.manual_seed(0)
    library = torch.nn.Conv2d(channels, 6, kernel, stride, padding, bias=bias)
    tiny = copy.deepcopy(library)
    assert use_matmul_for_tiny_maps(tiny) == 1 and isinstance(tiny, TinyMapConv2d)
    x = torch.randn(5, channels, size, size).contiguous(memory_format=torch.channels_last)
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    (library(a) ** 2).sum().backward()
    (tiny(b) ** 2).sum().backward()
    assert torch.allclose(library(a), tiny(b), atol=1e-5)
    assert torch.allclose(a.grad, b.grad, atol=1e-5) and torch.allclose(
        library.weight.grad, tiny.weight.grad, atol=1e-4
    )
    assert tiny.state_dict().keys() == library.state_dict().keys(), "checkpoints and serving see an nn.Conv2d"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.allclose(library(x).float(), tiny(x).float(), atol=0.1, rtol=0.05)


def test_on_the_cpu_the_last_stage_trains_as_matrix_products_unless_told(dataset, tmp_path, client):
    for given, used in (([], "matmul"), (["--tiny-maps", "conv"], "conv")):
        run_cli("train", "resnet", dataset, "--epochs", "1", "-b", "16", "-j", "0", "-p", "0", *given,
                "--out-dir", tmp_path, "--experiment", f"test-tiny-{used}")  # fmt: skip
        run = latest_run(client, f"test-tiny-{used}")
        assert run.data.params["tiny_maps"] == used
        summary = Path(client.download_artifacts(run.info.run_id, "model_summary.txt", str(tmp_path)))
        assert ("TinyMapConv2d" in summary.read_text()) == (used == "matmul")
        state = load_checkpoint(tmp_path / run.info.run_id / "best.pt")
        classifier_from_checkpoint(state)  # a plain torchvision model loads the weights (serving does)


def test_a_missing_cache_is_built_once_then_read_and_the_cpu_reads_it_without_workers(dataset, tmp_path, client,
                                                                                      monkeypatch):  # fmt: skip
    monkeypatch.setenv("DLOPS_CACHE_DIR", str(tmp_path / "fresh-cache"))
    train = ["train", "resnet", dataset, "--epochs", "1", "-b", "16", "-p", "0", "--out-dir", tmp_path]
    first = run_cli(*train, "--experiment", "test-cache-auto").output
    assert "=> train: decoded " in first and list((tmp_path / "fresh-cache").glob("data-train-*/images.npy"))
    again = run_cli(*train, "--experiment", "test-cache-auto").output
    assert "=> train: decoded " not in again
    for run in latest_runs(client, "test-cache-auto", 2):
        assert "decoded cache" in run.data.tags["data_path"] and run.data.params["workers"] == "0"
    run_cli(*train, "--data-cache", "off", "--experiment", "test-cache-off")
    off = latest_run(client, "test-cache-off")
    assert "image files" in off.data.tags["data_path"] and off.data.params["workers"] == str(JPEG_WORKERS)
    run_cli(*train, "-j", "1", "--experiment", "test-cache-workers")
    assert latest_run(client, "test-cache-workers").data.params["workers"] == "1", "-j given wins"


def latest_runs(client, experiment: str, count: int) -> list:
    found = client.get_experiment_by_name(experiment)
    return client.search_runs([found.experiment_id], order_by=["start_time DESC"], max_results=count)
