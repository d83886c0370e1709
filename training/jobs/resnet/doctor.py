"""What `dlops doctor` checks for the classifier (its spec's doctor): a few seconds of training steps
per device, precision and memory layout; room for the decoded cache; the options that suit the machine."""

from __future__ import annotations

import os
import shutil
import time
from typing import Any

import torch
from torch import nn

from training.hardware import CpuFacts, device_class, resolve_amp
from training.jobs.spec import Machine

PROBE_BATCH = 16
CACHE_NEED_GIB = 2.0  # the full Tiny-ImageNet decoded cache is about 1.3 GB


def training_step_rate(device: torch.device, amp: str, *, channels_last: bool, stem: str = "imagenet",
                       batch: int = PROBE_BATCH, seconds: float = 0.0) -> float:  # fmt: skip
    """images/s of resnet18 64x64 SGD steps on random data: one warm-up step, then steps for
    `seconds` (at least one). The probe here and bench/precision_throughput.py both time this."""
    from training.devices import autocast, synchronize
    from training.jobs.resnet.classifier import build_classifier

    torch.manual_seed(0)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    model = build_classifier("resnet18", 200, stem).to(device, memory_format=layout)
    images = torch.randn(batch, 3, 64, 64, device=device).contiguous(memory_format=layout)
    target = torch.randint(200, (batch,), device=device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, fused=device.type in ("cpu", "cuda"))

    def step() -> None:
        with autocast(device, amp):
            loss = nn.functional.cross_entropy(model(images), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    step()  # warm-up: oneDNN (or cuDNN) picks and caches its kernels
    synchronize(device)
    steps, start = 0, time.perf_counter()
    while steps == 0 or time.perf_counter() - start < seconds:
        step()
        steps += 1
    synchronize(device)
    return steps * batch / (time.perf_counter() - start)


def probe(devices: list[torch.device], budget_s: float) -> list[dict[str, Any]]:
    """images/s of one training step per (device, precision, layout), within `budget_s` in all."""
    rows = []
    deadline = time.monotonic() + budget_s
    for device in devices:
        for amp, channels_last in (("off", False), ("off", True), ("bf16", True), ("bf16", False)):
            row = {"device": str(device), "amp": amp, "channels_last": channels_last}
            if time.monotonic() > deadline:
                rows.append({**row, "skipped": f"the probe's {budget_s:g} s budget is spent"})
                continue
            try:
                rows.append(
                    {**row, "images_per_s": round(training_step_rate(device, amp, channels_last=channels_last), 1)}
                )
            except Exception as e:  # e.g. bf16 unsupported on this device
                rows.append({**row, "error": f"{type(e).__name__}: {e}"})
    return rows


def cache_folder() -> dict[str, Any]:
    from training.jobs.resnet.data.cache import cache_root

    root = cache_root()
    existing = root.resolve()
    while not existing.exists():
        existing = existing.parent
    free = shutil.disk_usage(existing).free / 2**30
    writable = os.access(existing, os.W_OK)
    return {
        "dir": str(root),
        "exists": root.is_dir(),
        "free_gib": round(free, 1),
        "ok": writable and free >= CACHE_NEED_GIB,
        "detail": f"needs about {CACHE_NEED_GIB:g} GiB for the full Tiny-ImageNet"
        + ("" if writable else "; not writable"),
    }


def recommend(cpu: CpuFacts, gpu_report: dict[str, Any]) -> dict[str, Any]:
    """The options that suit this machine, and why."""
    from training.jobs.resnet.recipes import RECIPES

    if gpu_report.get("cuda"):
        first = gpu_report["devices"][0]
        precision = "bf16" if first["bf16"] else "fp16"
        workers = min(8, cpu.cores)
        klass, why = "gpu", f"GPU {first['name']}: --amp auto gives {precision}"
    else:
        precision = resolve_amp("auto", "cpu", cpu).amp
        klass = device_class("cpu", cpu)
        workers = min(4, max(1, cpu.cores // 2))
        why = f"CPU, native bf16 {cpu.native_bf16} ({cpu.native_bf16_reason}): --amp auto gives {precision}"
    fast = RECIPES["fast"][klass]
    line = (
        f"dlops train resnet DATA --recipe fast -j {workers}   # {why}; the fast recipe for {klass}: "
        f"{fast['stem']} stem, batch {fast['batch_size']}; decode the images once first: dlops data cache DATA"
    )
    return {"amp": "auto", "amp_resolves_to": precision, "recipe": "fast", "device_class": klass,
            "workers": workers, "line": line}  # fmt: skip


def check(machine: Machine) -> dict[str, Any]:
    """The classifier's part of `dlops doctor`: data for --json, and the lines it prints."""
    devices = [torch.device("cpu")]
    if machine.gpu.get("cuda"):
        devices.insert(0, torch.device("cuda", 0))
    rows = probe(devices, machine.probe_budget_s) if machine.probe_budget_s > 0 else []
    cache = cache_folder()
    rec = recommend(machine.cpu, machine.gpu)
    lines = []
    if rows:
        lines.append(f"probe, resnet18 64x64, batch {PROBE_BATCH}, one SGD step, images/s:")
        for row in rows:
            what = row.get("images_per_s", row.get("skipped", row.get("error")))
            lines.append(f"  {row['device']:7s} {row['amp']:4s} channels_last={row['channels_last']!s:5s} {what}")
    mark = {True: "ok", False: "PROBLEM"}.get(cache["ok"], "?")
    lines.append(f"decoded-cache folder: {mark} {cache['dir']}: {cache['free_gib']} GiB free ({cache['detail']})")
    lines.append(f"recommendation: {rec['line']}")
    return {"probe": rows, "cache": cache, "recommendation": rec, "lines": lines}
