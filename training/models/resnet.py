"""torchvision ResNets with an optional small stem for 64x64 inputs."""

from __future__ import annotations

from torch import nn
from torchvision import models

ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "wide_resnet50_2", "resnext50_32x4d")
STEMS = ("imagenet", "small")


def build_resnet(arch: str, num_classes: int, stem: str = "imagenet") -> nn.Module:
    """A randomly initialised ResNet.

    stem="small" replaces the 7x7 stride-2 conv and the max-pool with a 3x3 stride-1 conv, the usual
    adaptation to 64x64 images: 16x more activations in layer1, so slower but more accurate.
    """
    if arch not in ARCHS:
        raise ValueError(f"--arch {arch!r} is not one of {', '.join(ARCHS)}")
    if stem not in STEMS:
        raise ValueError(f"--stem {stem!r} is not one of {', '.join(STEMS)}")
    model = getattr(models, arch)(weights=None, num_classes=num_classes)
    if stem == "small":
        model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    return model


def resnet_from_checkpoint(state: dict) -> nn.Module:
    """Rebuild the model a `kind == "resnet"` checkpoint describes, weights loaded, in eval mode."""
    config = state["config"]
    model = build_resnet(config["arch"], len(state["classes"]), config["stem"])
    model.load_state_dict(state["model"])
    return model.eval()
