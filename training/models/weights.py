"""Start a model from existing weights instead of from scratch.

--pretrained            torchvision's ImageNet weights for the arch (from torch's hub cache, or
                        downloaded there once; offline, a clear error says where to put the file)
--init-from CKPT        one of our own checkpoints, or models:/NAME/VERSION from the MLflow registry

Weights are copied tensor by tensor where the names and shapes match; the rest (a classifier head
for another number of classes, a small stem where the weights have ImageNet's) keeps its fresh
initialisation, and the run says which.
"""

from __future__ import annotations

import os
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from training.checkpoint import CheckpointError, load_checkpoint

if TYPE_CHECKING:
    from training.jobs.base import Job

REACH_TIMEOUT_S = 5.0
# A mirror of download.pytorch.org/models (same file names), e.g. inside a company network.
MIRROR_ENV = "DLOPS_TORCHVISION_WEIGHTS_URL"


def copy_matching(model: nn.Module, weights: dict[str, torch.Tensor]) -> list[str]:
    """Copy every tensor whose name and shape match; return the names of the model's tensors left as they were."""
    own = model.state_dict()
    matching = {k: v for k, v in weights.items() if k in own and own[k].shape == v.shape}
    model.load_state_dict(matching, strict=False)
    return sorted(k for k in own if k not in matching)


def torchvision_weights(arch: str) -> tuple[str, Path]:
    """The URL of torchvision's default ImageNet weights for `arch`, and where torch keeps them."""
    from torchvision import models

    try:
        weights = models.get_model_weights(arch).DEFAULT
    except (ValueError, KeyError) as e:
        raise ValueError(f"--pretrained: torchvision has no ImageNet weights for {arch!r}") from e
    url = weights.url
    mirror = os.environ.get(MIRROR_ENV)
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


def resolve_init_from(spec: str, workdir: Path) -> Path:
    """A local checkpoint path for --init-from: a file, or a model URI downloaded from the registry."""
    from training.tracking import registry

    try:
        return registry.local_checkpoint(spec, workdir)[0]
    except registry.RegistryError as e:
        raise ValueError(f"--init-from {e}") from e


def warm_start(job: Job, model: nn.Module) -> dict[str, Any]:
    """Apply --pretrained and/or --init-from to a freshly built model; return what was done (run params)."""
    config = job.config
    done: dict[str, Any] = {}
    if getattr(config, "pretrained", False):
        done["pretrained_fresh_tensors"] = len(load_pretrained(model, config.arch))
    if config.init_from:
        with tempfile.TemporaryDirectory() as tmp:
            path = resolve_init_from(config.init_from, Path(tmp))
            source = load_checkpoint(path)
            if source["kind"] != job.kind:
                raise CheckpointError(f"--init-from {config.init_from}: a {source['kind']!r} checkpoint cannot "
                                      f"start a {job.kind!r} model")  # fmt: skip
            job.check_warm_start(source)
            kept = copy_matching(model, source["model"])
        print(f"=> --init-from {config.init_from}: weights of run {source.get('run_id')} epoch {source.get('epoch')}; "
              f"fresh: {', '.join(kept) or 'none'}")  # fmt: skip
        done["init_from_run_id"] = str(source.get("run_id"))
    return done
