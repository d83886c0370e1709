"""Named option presets for the ResNet job, resolved per device class. Explicit options win.

reference: PyTorch's ImageNet example as run on Tiny-ImageNet (ResNetConfig's own defaults):
    imagenet stem, fp32, SGD lr 0.1 momentum 0.9 wd 1e-4, batch 256, step schedule, flip.
fast: "the best validation accuracy per wall-clock second on this device". Its values depend on
    the device class (training.hardware.device_class):
    gpu       the 64x64 recipe: 3x3 stride-1 stem without max-pool, --amp auto (bf16, or fp16
              before Ampere), channels_last, nesterov SGD with a one-cycle schedule peaking at 0.4,
              wd 5e-4 on conv/linear weights only, label smoothing 0.1, per-sample reflect-pad crop
              + flip, batch 256, 40 epochs; the decoded cache stays on the GPU when it fits.
    cpu-bf16  a CPU with native bf16 (avx512_bf16 or AMX): imagenet stem, bf16, batch 128, peak lr 0.2;
    cpu       any other CPU: imagenet stem, fp32, batch 64, peak lr 0.1.
    The CPU values won bench/recipe_budget.py on the real Tiny-ImageNet slice, 150 s of training
    each (README, "Choices per device"): on a CPU the small stem costs 6-15x per image, which its
    per-epoch gain does not repay; bf16 where native, fp32 elsewhere; the batch that won per class.
    The peak lr follows the batch (0.4 x batch / 256). --epochs sets the schedule's length; the CPU
    defaults (14 with native bf16, 6 without) are an hour on 2 cores on the full Tiny-ImageNet, where
    14 epochs reached 50.7% val top-1 (bench/time_to_accuracy.py, docs/benchmarks.md).
"""

from __future__ import annotations

from typing import Any

DEVICE_CLASSES = ("gpu", "cpu-bf16", "cpu")


def _fast(stem: str, batch_size: int, epochs: int) -> dict[str, Any]:
    """The fast recipe for one device class: what differs is the stem, the batch and the length; the
    peak learning rate follows the batch (0.4 at 256); precision is --amp auto, resolved per device."""
    return {
        "stem": stem,
        "batch_size": batch_size,
        "lr": 0.4 * batch_size / 256,
        "epochs": epochs,
        "amp": "auto",
        "channels_last": True,
        "nesterov": True,
        "scheduler": "one-cycle",
        "weight_decay": 5e-4,
        "norm_weight_decay": False,
        "label_smoothing": 0.1,
        "augment": "flip-crop",
    }


RECIPES: dict[str, dict[str, dict[str, Any]]] = {
    "reference": {klass: {} for klass in DEVICE_CLASSES},
    "fast": {
        "gpu": _fast("small", 256, 40),
        # the CPU lengths: an hour of training on 2 cores of each class (docs/benchmarks.md, full Tiny-ImageNet)
        "cpu-bf16": _fast("imagenet", 128, 14),
        "cpu": _fast("imagenet", 64, 6),
    },
}


def recipe_values(name: str, device_class: str) -> dict[str, Any]:
    if name not in RECIPES:
        raise ValueError(f"--recipe {name!r} is not one of {', '.join(RECIPES)}")
    return dict(RECIPES[name][device_class])


def apply_recipe(name: str, device_class: str, options: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
    """Defaults, then the recipe's values for this device class, then what the user typed."""
    resolved = {**options, **recipe_values(name, device_class), **given}
    return {**resolved, "recipe": name, "recipe_device_class": device_class}
