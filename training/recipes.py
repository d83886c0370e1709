"""Named option presets for the ResNet job. Explicit command-line options override a preset.

reference: PyTorch's ImageNet example as run on Tiny-ImageNet (ResNetConfig's own defaults):
    imagenet stem, fp32, SGD lr 0.1 momentum 0.9 wd 1e-4, batch 256, step schedule, flip.
fast: the 64x64 recipe: 3x3 stride-1 stem without max-pool, bf16 autocast, channels_last,
    nesterov SGD with a one-cycle schedule peaking at 0.4, wd 5e-4 on conv/linear weights only,
    label smoothing 0.1, per-sample reflect-pad-4 crop + flip, 40 epochs, batch 256; it uses a
    decoded cache when one exists (and keeps it on the GPU when it fits).
"""

from __future__ import annotations

from typing import Any

RECIPES: dict[str, dict[str, Any]] = {
    "reference": {},
    "fast": {
        "stem": "small",
        "amp": "bf16",
        "channels_last": True,
        "nesterov": True,
        "scheduler": "one-cycle",
        "lr": 0.4,
        "weight_decay": 5e-4,
        "norm_weight_decay": False,
        "label_smoothing": 0.1,
        "augment": "flip-crop",
        "batch_size": 256,
        "epochs": 40,
    },
}


def apply_recipe(name: str, options: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
    """Defaults, then the recipe's values, then what the user typed."""
    if name not in RECIPES:
        raise ValueError(f"--recipe {name!r} is not one of {', '.join(RECIPES)}")
    return {**options, **RECIPES[name], **given, "recipe": name}
