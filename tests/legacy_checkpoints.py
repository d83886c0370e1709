"""Checkpoints in format version 1, as dlops wrote them until 2026-11 (commit 0e2ce41), for the tests
that show they still load, evaluate, generate, package and resume.

Each writer builds the same dict the old `train_resnet` / `train_lm` saved after an epoch: the same
keys, the same nesting, the same config fields with their old defaults, the weights after real
optimizer steps (so the optimizer holds momentum buffers). Checked against files written by that
commit when the format changed (the key sets, nested key sets and value types were identical).
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision import models

from training.checkpoint import rng_state, save_checkpoint

V1_RESNET_CONFIG = {
    "data": None, "arch": "resnet18", "stem": "imagenet", "image_size": 64, "batch_size": 256, "epochs": 20,
    "lr": 0.1, "momentum": 0.9, "nesterov": False, "weight_decay": 0.0001, "norm_weight_decay": True,
    "scheduler": "step", "lr_step_size": 30, "lr_gamma": 0.1, "label_smoothing": 0.0, "augment": "flip",
    "amp": "off", "channels_last": False, "compile": False, "workers": 2, "seed": 0, "device": "auto",
    "dummy": False, "data_cache": "auto", "data_on_gpu": "auto", "recipe": "reference", "limit_train": None,
    "limit_val": None, "print_freq": 10, "early_stop_patience": 0, "experiment": "resnet-tinyimagenet",
    "run_name": None, "registered_model": "resnet-tinyimagenet", "out_dir": "runs", "nproc_per_node": 1, "tags": {},
}  # fmt: skip
V1_LM_CONFIG = {
    "data": None, "model": "LSTM", "emsize": 200, "nhid": 200, "nlayers": 2, "nhead": 2, "dropout": 0.2,
    "tied": False, "lr": 20.0, "clip": 0.25, "epochs": 40, "batch_size": 20, "eval_batch_size": 10, "bptt": 35,
    "amp": "off", "compile": False, "seed": 1111, "device": "auto", "log_interval": 200, "dry_run": False,
    "experiment": "wordlm-wikitext2", "run_name": None, "registered_model": "wordlm-wikitext2", "out_dir": "runs",
}  # fmt: skip
RESNET_METRICS = ("train/loss", "train/acc1", "train/acc5", "train/images", "val/loss", "val/acc1", "val/acc5", "lr",
                  "time/epoch_seconds", "time/images_per_second", "time/data_wait_share")  # fmt: skip


def write_v1_resnet(path, classes: list[str], labels: list[str], run_id: str, data: str, epoch: int = 1, **config):
    """A version-1 ResNet checkpoint after `epoch` epochs of a run with `config` (resnet18, 64x64)."""
    cfg = {**V1_RESNET_CONFIG, "data": data, **config}
    model = models.resnet18(weights=None, num_classes=len(classes))
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg["lr"], momentum=cfg["momentum"],
                                weight_decay=cfg["weight_decay"], fused=True)  # fmt: skip
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, cfg["lr_step_size"], cfg["lr_gamma"])
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    images, target = torch.randn(4, 3, 64, 64), torch.arange(4) % len(classes)
    for _ in range(epoch):
        nn.functional.cross_entropy(model(images), target).backward()
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
    state = {
        "kind": "resnet",
        "format_version": 1,
        "epoch": epoch,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "train_state": {"epoch": epoch, "best_acc1": 25.0, "best_epoch": epoch, "best_val_loss": 1.5,
                        "epochs_since_improvement": 0, "train_seconds": 3.0 * epoch, "seconds_to_best": 3.0 * epoch},
        "metrics": {name: 48 if name == "train/images" else 1.0 for name in RESNET_METRICS},
        "rng": rng_state(),
        "config": cfg,
        "classes": classes,
        "labels": labels,
        "image_size": 64,
        "normalization": {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
        "experiment": cfg["experiment"],
        "run_id": run_id,
    }  # fmt: skip
    save_checkpoint(state, path)
    return state


def write_v1_lm(path, vocab: list[str], run_id: str, data: str, epoch: int = 1, **config):
    """A version-1 LSTM language-model checkpoint (the old LMConfig fields, no scaler entry)."""
    from training.jobs.lm.wordlm import build_language_model

    torch.manual_seed(0)  # the same weights whatever ran before in this process
    cfg = {**V1_LM_CONFIG, "data": data, **config}
    model_config = {"model": cfg["model"], "ntokens": len(vocab), "emsize": cfg["emsize"], "nhid": cfg["nhid"],
                    "nlayers": cfg["nlayers"], "nhead": cfg["nhead"], "dropout": cfg["dropout"],
                    "tied": cfg["tied"]}  # fmt: skip
    model = build_language_model(**model_config)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg["lr"], fused=True)
    tokens = torch.randint(len(vocab), (cfg["bptt"] + 1, 2))
    output, _ = model(tokens[:-1])
    nn.functional.cross_entropy(output, tokens[1:].reshape(-1)).backward()
    optimizer.step()
    state = {
        "kind": "lm",
        "format_version": 1,
        "epoch": epoch,
        "model": model.state_dict(),
        "model_config": model_config,
        "vocab": vocab,
        "optimizer": optimizer.state_dict(),
        "train_state": {"epoch": epoch, "lr": cfg["lr"], "global_step": 10 * epoch, "best_val_loss": 5.0,
                        "best_epoch": epoch, "train_seconds": 2.0 * epoch},
        "metrics": {"train/epoch_loss": 5.0, "val/loss": 5.0, "val/ppl": 148.4, "lr": cfg["lr"],
                    "time/epoch_seconds": 2.0, "time/tokens_per_second": 1000.0},
        "rng": rng_state(),
        "config": cfg,
        "experiment": cfg["experiment"],
        "run_id": run_id,
    }  # fmt: skip
    save_checkpoint(state, path)
    return state
