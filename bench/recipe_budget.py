"""Which stem, precision and batch size reach the best val Acc@1 in a fixed wall-clock budget?

The measurement behind `--recipe fast`'s per-device values (training/jobs/resnet/recipes.py). Run by hand:

    .venv/bin/python bench/recipe_budget.py --data ../shared/data/tiny-imagenet-200-mini \
        [--budget 150] [--kind native|avx2] [--configs reference,imagenet-fp32-b128,...]

Every configuration trains resnet18 from scratch for --budget seconds of training on the decoded
train split, held in memory (no loader cost), then is evaluated once on the whole val split (in
fp32, not counted in the budget). The fast configurations use the fast recipe's optimizer (nesterov
SGD, wd 5e-4 without BatchNorm decay, label smoothing 0.1, crop+flip) with a one-cycle schedule
sized to the budget: a few timed steps first estimate how many steps fit, so the schedule ends
when the time does. `reference` is the ImageNet example's settings (imagenet stem, fp32, SGD
lr 0.1, wd 1e-4, flip, batch 256; its step schedule does not drop within a short budget).
`--kind avx2` runs the same in a child process restricted to AVX2 kernels
(ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2), close to an AVX2-only CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

CONFIGS = {
    # name: (stem, amp, batch, channels_last, fast optimizer)
    "reference": ("imagenet", "off", 256, False, False),
    "imagenet-fp32-b64": ("imagenet", "off", 64, True, True),
    "imagenet-fp32-b128": ("imagenet", "off", 128, True, True),
    "imagenet-fp32-b256": ("imagenet", "off", 256, True, True),
    "imagenet-bf16-b64": ("imagenet", "bf16", 64, True, True),
    "imagenet-bf16-b128": ("imagenet", "bf16", 128, True, True),
    "imagenet-bf16-b256": ("imagenet", "bf16", 256, True, True),
    "small-fp32-b128": ("small", "off", 128, True, True),
    "small-bf16-b128": ("small", "bf16", 128, True, True),
}
KINDS = {"native": {}, "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}}
PEAK_LR_AT_256 = 0.4  # the fast recipe's one-cycle peak for batch 256, scaled linearly with the batch


@dataclass
class Result:
    config: str
    steps: int
    images: int
    epochs: float
    train_seconds: float
    images_per_s: float
    val_acc1: float
    val_acc5: float


def run_config(name: str, data: Path, budget: float, cache_dir: Path) -> Result:
    import numpy as np
    import torch
    from torch import nn

    from training.devices import autocast
    from training.jobs.resnet.classifier import build_classifier
    from training.jobs.resnet.data.batches import BatchTransform, TensorBatches
    from training.jobs.resnet.data.cache import build_cache
    from training.jobs.resnet.data.images import IMAGENET_MEAN, IMAGENET_STD
    from training.jobs.resnet.data.index import load_image_dataset

    stem, amp, batch, channels_last, fast = CONFIGS[name]
    ds = load_image_dataset(data)
    train_cache, val_cache = (build_cache(ds, split=split, root=cache_dir) for split in ("train", "val"))
    images = torch.from_numpy(np.array(train_cache.images)).permute(0, 3, 1, 2)
    labels = torch.from_numpy(train_cache.labels)
    torch.manual_seed(0)
    batches = TensorBatches(lambda i: (images[i], labels[i]), len(labels), batch, shuffle=True, drop_last=True)
    prepare = BatchTransform("flip-crop" if fast else "flip", IMAGENET_MEAN, IMAGENET_STD, train=True)
    model = build_classifier("resnet18", ds.num_classes, stem)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    if fast:
        decay = [p for p in model.parameters() if p.ndim > 1]
        no_decay = [p for p in model.parameters() if p.ndim <= 1]
        groups = [{"params": decay, "weight_decay": 5e-4}, {"params": no_decay, "weight_decay": 0.0}]
        optimizer = torch.optim.SGD(groups, lr=0.1, momentum=0.9, nesterov=True, fused=True)
        criterion = nn.CrossEntropyLoss(label_smoothing=0.1)
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4, fused=True)
        criterion = nn.CrossEntropyLoss()
    cpu = torch.device("cpu")

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        x = prepare(x).contiguous(memory_format=memory_format)
        with autocast(cpu, amp):
            loss = criterion(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def endless():
        epoch = 0
        while True:
            batches.set_epoch(epoch)
            yield from batches
            epoch += 1

    stream = endless()
    model.train()
    # Estimate the step time on a few steps at a tiny lr after two warm-up steps (oneDNN picks its
    # kernels); all of them count against the budget.
    for group in optimizer.param_groups:
        group["lr"] = 1e-4
    start = time.perf_counter()
    for _ in range(2):
        step(*next(stream))
    timed, probe = time.perf_counter(), 5
    for _ in range(probe - 2):
        step(*next(stream))
    per_step = (time.perf_counter() - timed) / (probe - 2)
    total = max(1, int((budget - (time.perf_counter() - start)) / per_step))
    scheduler = None
    if fast:
        peak = PEAK_LR_AT_256 * batch / 256
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=peak, total_steps=total)
    else:
        for group in optimizer.param_groups:
            group["lr"] = 0.1
    steps = probe
    # the one-cycle schedule ends after `total` steps; the reference has none and trains to the budget
    while (scheduler is None or steps - probe < total) and time.perf_counter() - start < budget:
        step(*next(stream))
        if scheduler is not None:
            scheduler.step()
        steps += 1
    seconds = time.perf_counter() - start

    model.eval()
    val_images = torch.from_numpy(np.array(val_cache.images)).permute(0, 3, 1, 2)
    val_labels = torch.from_numpy(val_cache.labels)
    evaluate = BatchTransform("none", IMAGENET_MEAN, IMAGENET_STD, train=False)
    hits1 = hits5 = 0
    with torch.no_grad():
        for i in range(0, len(val_labels), 500):
            x = evaluate(val_images[i : i + 500]).contiguous(memory_format=memory_format)
            top5 = model(x).topk(5, dim=1).indices
            hits = top5.eq(val_labels[i : i + 500, None])
            hits1 += int(hits[:, 0].sum())
            hits5 += int(hits.sum())
    n = len(val_labels)
    return Result(name, steps, steps * batch, steps * batch / len(labels), round(seconds, 1),
                  round(steps * batch / seconds, 1), round(100 * hits1 / n, 2), round(100 * hits5 / n, 2))  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--budget", type=float, default=150.0, help="training seconds per configuration")
    parser.add_argument("--kind", choices=list(KINDS), default="native")
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated: {', '.join(CONFIGS)}")
    parser.add_argument("--cache-dir", type=Path, default=None, help="decoded cache (default: a temporary folder)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    names = args.configs.split(",")
    unknown = sorted(set(names) - set(CONFIGS))
    if unknown:
        parser.error(f"unknown configurations {unknown}; known: {', '.join(CONFIGS)}")
    if not args.child:
        command = [sys.executable, __file__, "--child", *sys.argv[1:]]
        sys.exit(subprocess.run(command, env={**os.environ, **KINDS[args.kind]}).returncode)

    from training.hardware import cpu_facts, resolve_amp

    cpu = cpu_facts()
    print(f"# {cpu.model}, {cpu.cores} cores, kind {args.kind} (torch ISA {cpu.capability}, native bf16 "
          f"{cpu.native_bf16}: {cpu.native_bf16_reason}); --amp auto -> {resolve_amp('auto', 'cpu', cpu).amp}; "
          f"budget {args.budget:g} s of training per configuration", flush=True)  # fmt: skip
    print("| configuration | steps | epochs | train s | img/s | val Acc@1 | val Acc@5 |\n|---|---|---|---|---|---|---|")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            r = run_config(name, args.data, args.budget, args.cache_dir or Path(tmp))
            results.append(r.__dict__)
            print(f"| {name} | {r.steps} | {r.epochs:.2f} | {r.train_seconds} | {r.images_per_s} | {r.val_acc1} | "
                  f"{r.val_acc5} |", flush=True)  # fmt: skip
    print(json.dumps({"kind": args.kind, "budget": args.budget, "cpu": cpu.as_dict(), "results": results}))


if __name__ == "__main__":
    main()
