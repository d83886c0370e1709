"""Every torchvision classification model by name (as the ImageNet example's `-a`), adapted to 64x64.

    build_classifier("resnet18", num_classes=200, stem="small", image_size=64)

Adaptations for small images:
- stem="small" (ResNet, ResNeXt and Wide ResNet): the 7x7 stride-2 conv and the max-pool become one
  3x3 stride-1 conv, the usual 64x64 adaptation (16x more activations in layer1: slower, more
  accurate). Other families keep their own stem; most downsample 32x, so a 64x64 image ends as
  2x2 features.
- Vision Transformers are built for `image_size` (their position embeddings are sized to it);
  the patch size must divide it (vit_h_14 needs a multiple of 14).
- GoogLeNet and Inception v3 are built without their auxiliary heads (the loop trains one output).
- 77 of the 80 run at 64x64; `input_size_problem` says why the others do not (vit_h_14,
  inception_v3, maxvit_t) and which --image-size they need.

This file imports only torch and torchvision, so a TorchServe .mar ships it as it is.
"""

from __future__ import annotations

import torchvision
from torch import nn
from torchvision import models

ARCHS = tuple(sorted(models.list_models(module=torchvision.models)))
STEMS = ("imagenet", "small")
SMALL_STEM_FAMILIES = ("resnet", "resnext", "wide_resnet")


def small_stem_applies(arch: str) -> bool:
    return arch.startswith(SMALL_STEM_FAMILIES)


def input_size_problem(arch: str, image_size: int) -> str | None:
    """Why `arch` cannot take `image_size` x `image_size` inputs, or None (checked for all 80 at 64)."""
    if arch.startswith("vit_"):
        patch = int(arch.rsplit("_", 1)[1])
        if image_size % patch:
            return f"{arch} cuts images into {patch}x{patch} patches: --image-size must be a multiple of {patch}"
    if arch == "inception_v3" and image_size < 75:
        return "inception_v3 needs inputs of at least 75x75 (--image-size 75 or more; its own size is 299)"
    if arch.startswith("maxvit") and image_size % 224:
        return f"{arch} attends in 7x7 windows at 1/32 scale: --image-size must be a multiple of 224"
    return None


def _constructor_options(arch: str, image_size: int) -> dict:
    if arch.startswith("vit_"):
        return {"image_size": image_size}
    if arch in ("googlenet", "inception_v3"):
        return {"aux_logits": False, "init_weights": True}
    return {}


def build_classifier(arch: str, num_classes: int, stem: str = "imagenet", image_size: int = 64) -> nn.Module:
    """A randomly initialised torchvision classifier for `num_classes` classes and `image_size` inputs."""
    if arch not in ARCHS:
        raise ValueError(f"--arch {arch!r} is not a torchvision classification model (see `dlops summary --list`)")
    if stem not in STEMS:
        raise ValueError(f"--stem {stem!r} is not one of {', '.join(STEMS)}")
    if stem == "small" and not small_stem_applies(arch):
        raise ValueError(f"--stem small applies to ResNet, ResNeXt and Wide ResNet models, not {arch}")
    problem = input_size_problem(arch, image_size)
    if problem:
        raise ValueError(problem)
    model = models.get_model(arch, weights=None, num_classes=num_classes, **_constructor_options(arch, image_size))
    if stem == "small":
        model.conv1 = nn.Conv2d(3, model.conv1.out_channels, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    return model


def classifier_from_checkpoint(state: dict) -> nn.Module:
    """Rebuild the model an image-classification checkpoint describes, weights loaded, in eval mode."""
    model = build_classifier(**state["model_config"])
    model.load_state_dict(state["model"])
    return model.eval()
