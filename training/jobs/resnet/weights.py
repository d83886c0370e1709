"""Start a model from existing weights instead of from scratch.

--pretrained            torchvision's ImageNet weights for the arch (from torch's hub cache, or
                        downloaded there once; offline, a clear error says where to put the file)
--init-from CKPT        one of our own checkpoints or registered models (the trainer resolves it)

Weights are copied tensor by tensor where the names and shapes match; the rest (a classifier head
for another number of classes, a small stem where the weights have ImageNet's) keeps its fresh
initialisation, and the run says which.
"""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from pathlib import Path

import torch
from torch import nn

from serving import environment
from training.checkpoint import copy_matching

REACH_TIMEOUT_S = 5.0
# A mirror of download.pytorch.org/models (same file names), e.g. inside a company network.


def torchvision_weights(arch: str) -> tuple[str, Path]:
    """The URL of torchvision's default ImageNet weights for `arch`, and where torch keeps them."""
    from torchvision import models

    try:
        weights = models.get_model_weights(arch).DEFAULT
    except (ValueError, KeyError) as e:
        raise ValueError(f"--pretrained: torchvision has no ImageNet weights for {arch!r}") from e
    url = weights.url
    mirror = os.environ.get(environment.WEIGHTS_MIRROR)
    if mirror:
        url = f"{mirror.rstrip('/')}/{url.rsplit('/', 1)[1]}"
    return url, Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[1]


def fetch_weights(url: str, path: Path) -> None:
    """Download `url` to `path`; fail within seconds, saying where to put the file, when offline."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=REACH_TIMEOUT_S):
            pass
    except (urllib.error.URLError, OSError) as e:
        raise ValueError(
            f"--pretrained: the weights are not on this machine and {url} cannot be reached ({e}). Download "
            f"that file elsewhere and put it at {path} (torch's hub cache; TORCH_HOME moves it)"
        ) from e
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.hub.download_url_to_file(url, str(path), progress=True)


def load_pretrained(model: nn.Module, arch: str) -> list[str]:
    url, path = torchvision_weights(arch)
    if not path.is_file():
        fetch_weights(url, path)
    try:
        weights = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for a corrupt file
        raise ValueError(f"--pretrained: {path} cannot be read ({e}); delete it to download it again") from e
    kept = copy_matching(model, weights)
    print(f"=> --pretrained: torchvision's ImageNet weights from {path}; fresh: {', '.join(kept) or 'none'}")
    return kept
