"""images/s of resnet18 at 64x64 through four data paths, loader-only and full training steps, one run.

Run by hand (not a test):

    .venv/bin/python bench/train_throughput.py --data ../shared/data/tiny-imagenet-200-mini [--batches 30]

(a) example: a loop written like PyTorch's ImageNet example: ImageFolder + PIL (RandomResizedCrop,
    flip) in DataLoader workers, fp32, loss.item() and accuracy every batch.
(b) project: the project's JPEG loader (ImageFiles, PIL) and training loop.
(c) cache: the decoded uint8 cache through DataLoader workers (memory-mapped), batch augmentation.
(d) resident: the decoded cache as one tensor on the device (the GPU when there is one), batches
    indexed and augmented there, no DataLoader.
(b)-(d) use --amp and --channels-last as given; (a) is always fp32. The same model, batch size
and number of timed batches for all. Also: summed memory (RSS and PSS) of the process and its
DataLoader workers while the cache is read with 0 and with 4 workers (PSS splits shared pages,
so a cache shared by the workers counts once).
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import torch
from torch import nn
from torchvision import datasets, transforms

from training.devices import autocast, choose_device, synchronize
from training.jobs.resnet.classifier import build_classifier
from training.jobs.resnet.data.batches import BatchTransform, TensorBatches
from training.jobs.resnet.data.cache import CachedImages, build_cache, collate_batch
from training.jobs.resnet.data.images import IMAGENET_MEAN, IMAGENET_STD, ImageFiles, make_loader, train_transform
from training.jobs.resnet.data.index import load_image_dataset
from training.jobs.resnet.loop import to_device


def endless(batches):
    """Batches without end: epochs repeat."""
    while True:
        yield from batches


def timed_loader(batches, n: int, device, prepare=None) -> float:
    """images/s of fetching (and preparing) n batches, no model."""
    it = endless(batches)
    next(it)  # workers start-up is not throughput
    count, start = 0, time.perf_counter()
    for _ in range(n):
        images, target = next(it)
        images, target = to_device(images, target, device, channels_last=False, prepare=prepare)
        count += images.size(0)
    synchronize(device)
    return count / (time.perf_counter() - start)


def timed_steps(batches, n: int, model, *, device, amp: str, channels_last: bool, prepare=None, example_style=False):
    """images/s of n full training steps (forward, backward, optimizer)."""
    criterion = nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, fused=not example_style)
    model.train()
    it = endless(batches)
    count, start = 0, None
    for step in range(n + 2):
        if step == 2:  # two warm-up steps
            synchronize(device)
            count, start = 0, time.perf_counter()
        images, target = next(it)
        images, target = to_device(images, target, device, channels_last=channels_last, prepare=prepare)
        with autocast(device, "off" if example_style else amp):
            output = model(images)
            loss = criterion(output, target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if example_style:  # the example's meters read every batch back
            loss.item()
            (output.argmax(1) == target).float().mean().item()
        count += images.size(0)
    synchronize(device)
    return count / (time.perf_counter() - start)


def memory_while(fn) -> dict[str, float]:
    """Peak summed RSS and PSS (MB) of this process and its children while fn() runs."""
    peak = {"rss_mb": 0.0, "pss_mb": 0.0}
    done = threading.Event()

    def sample() -> None:
        me = psutil.Process()
        while not done.is_set():
            rss = pss = 0
            for p in [me, *me.children(recursive=True)]:
                try:
                    info = p.memory_full_info()
                    rss, pss = rss + info.rss, pss + info.pss
                except psutil.Error:
                    pass
            peak["rss_mb"] = max(peak["rss_mb"], rss / 2**20)
            peak["pss_mb"] = max(peak["pss_mb"], pss / 2**20)
            time.sleep(0.05)

    thread = threading.Thread(target=sample)
    thread.start()
    try:
        fn()
    finally:
        done.set()
        thread.join()
    return {k: round(v, 1) for k, v in peak.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="a Tiny-ImageNet folder (original layout)")
    parser.add_argument("--batches", type=int, default=30, help="timed batches per figure")
    parser.add_argument("-b", "--batch-size", type=int, default=64)
    parser.add_argument("-j", "--workers", type=int, default=4)
    parser.add_argument("--stem", default="imagenet", choices=["imagenet", "small"])
    parser.add_argument("--amp", default="bf16", choices=["off", "bf16", "fp16"])
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--cache-dir", type=Path, default=None, help="default: a temporary folder")
    args = parser.parse_args()
    device = choose_device(args.device).device
    torch.manual_seed(0)
    ds = load_image_dataset(args.data)
    n_classes = ds.num_classes
    print(f"# {platform.machine()} {psutil.cpu_count()} CPUs, torch {torch.__version__}, device {device}, "
          f"resnet18 {args.stem} stem, batch {args.batch_size}, {args.batches} timed batches, {args.workers} "
          f"workers, (b)-(d): amp {args.amp}, channels_last {args.channels_last}", flush=True)  # fmt: skip

    with tempfile.TemporaryDirectory() as tmp:
        cache_root = args.cache_dir or Path(tmp)
        cache = build_cache(ds, split="train", root=cache_root)
        example_tf = transforms.Compose([
            transforms.RandomResizedCrop(64), transforms.RandomHorizontalFlip(), transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ])  # fmt: skip
        paths = {
            "a example (ImageFolder, PIL, fp32)": (
                make_loader(
                    datasets.ImageFolder(args.data / "train", example_tf),
                    args.batch_size,
                    args.workers,
                    device=device,
                    shuffle=True,
                ),
                None,
                True,
            ),  # fmt: skip
            "b project JPEG loader": (
                make_loader(
                    ImageFiles(ds.train, train_transform("flip-crop", 64)),
                    args.batch_size,
                    args.workers,
                    device=device,
                    shuffle=True,
                ),
                None,
                False,
            ),  # fmt: skip
            "c decoded cache, DataLoader": (
                make_loader(
                    CachedImages(cache),
                    args.batch_size,
                    args.workers,
                    device=device,
                    shuffle=True,
                    collate_fn=collate_batch,
                ),
                "prepare",
                False,
            ),  # fmt: skip
        }
        images = torch.from_numpy(np.ascontiguousarray(cache.images)).permute(0, 3, 1, 2).to(device)
        labels = torch.from_numpy(cache.labels).to(device)
        paths[f"d resident on {device.type}"] = (
            TensorBatches(
                lambda i: (images[i.to(device)], labels[i.to(device)]), len(labels), args.batch_size, shuffle=True
            ),
            "prepare",
            False,
        )
        prepare = BatchTransform("flip-crop", IMAGENET_MEAN, IMAGENET_STD, train=True)
        rows = []
        for name, (batches, needs_prepare, example_style) in paths.items():
            p = prepare if needs_prepare else None
            loader_rate = timed_loader(batches, args.batches, device, p)
            model = build_classifier("resnet18", n_classes, args.stem).to(device)
            channels_last = args.channels_last and not example_style
            if channels_last:
                model = model.to(memory_format=torch.channels_last)
            step_rate = timed_steps(
                batches,
                args.batches,
                model,
                device=device,
                amp=args.amp,
                channels_last=channels_last,
                prepare=p,
                example_style=example_style,
            )
            rows.append(
                {"path": name, "loader_images_per_s": round(loader_rate), "step_images_per_s": round(step_rate)}
            )
            print(f"{name:38s} loader {loader_rate:9.0f} img/s   full step {step_rate:8.1f} img/s", flush=True)

        memory = {}
        for workers in (0, 4):
            loader = make_loader(CachedImages(cache), args.batch_size, workers, device=device, shuffle=True,
                                 collate_fn=collate_batch)  # fmt: skip
            memory[f"{workers}_workers"] = memory_while(lambda loader=loader: [None for _ in loader])
        print(f"cache of {cache.images.nbytes / 2**20:.0f} MB read once through, peak memory: {memory}")
        print(json.dumps({"rows": rows, "memory": memory}))


if __name__ == "__main__":
    main()
