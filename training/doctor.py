"""`dlops doctor`: what this machine offers the project, a short speed probe, and a recommendation.

What a user pastes into a bug report and reads before a long run. Every section is gathered on
its own: a missing part (no GPU, no Java, a tracking server that is down) is reported, never fatal.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import sqlite3
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import torch
from torch import nn

from training.hardware import CpuFacts, cpu_facts, device_class, gpu_facts, resolve_amp

PROBE_BATCH = 16
CACHE_NEED_GIB = 2.0  # the full Tiny-ImageNet decoded cache is about 1.3 GB


def _section(fn, *args) -> dict[str, Any]:
    """Run one check; a failure becomes {"error": ...} instead of stopping the report."""
    try:
        return fn(*args)
    except Exception as e:  # a diagnosis reports what is broken; it does not break
        return {"error": f"{type(e).__name__}: {e}"}


def software() -> dict[str, Any]:
    import torchvision

    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "cuda_build": torch.version.cuda,
        "cudnn": cudnn,
        "platform": platform.platform(),
    }


def gpus() -> dict[str, Any]:
    if torch.version.cuda is None:
        return {"cuda": False, "reason": f"torch {torch.__version__} is built without CUDA", "devices": []}
    count = torch.cuda.device_count()
    if count == 0:
        return {"cuda": False, "reason": "no CUDA device is visible (no GPU, or no driver)", "devices": []}
    devices = []
    for index in range(count):
        facts = gpu_facts(index).as_dict()
        free, _ = torch.cuda.mem_get_info(index)
        devices.append({**facts, "free_gib": round(free / 2**30, 1)})
    return {"cuda": True, "devices": devices}


def training_step_rate(device: torch.device, amp: str, *, channels_last: bool, stem: str = "imagenet",
                       batch: int = PROBE_BATCH, seconds: float = 0.0) -> float:  # fmt: skip
    """images/s of resnet18 64x64 SGD steps on random data: one warm-up step, then steps for
    `seconds` (at least one). The probe here and bench/precision_throughput.py both time this."""
    from training.devices import autocast, synchronize
    from training.models.classifier import build_classifier

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


def java() -> dict[str, Any]:
    path = shutil.which("java")
    if path is None:
        return {"ok": False, "hint": "TorchServe needs Java 17: apt-get install -y openjdk-17-jre-headless"}
    out = subprocess.run([path, "-version"], capture_output=True, text=True, timeout=20)
    version = (out.stderr or out.stdout).splitlines()[0] if (out.stderr or out.stdout) else "unknown"
    return {"ok": out.returncode == 0, "path": path, "version": version}


def tracking() -> dict[str, Any]:
    from training.tracking import tracking_uri

    uri = tracking_uri()
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=5) as response:
                return {"uri": uri, "ok": response.status == 200, "detail": f"server answered {response.status}"}
        except OSError as e:
            return {"uri": uri, "ok": False, "detail": f"server unreachable: {e}"}
    if uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///"))
        if not db.exists():
            writable = os.access(db.parent if db.parent.exists() else Path.cwd(), os.W_OK)
            return {"uri": uri, "ok": writable, "detail": "not created yet (the first run creates it)"}
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as connection:
            runs = connection.execute("SELECT COUNT(*) FROM runs").fetchone()[0]
        return {"uri": uri, "ok": True, "detail": f"{runs} runs"}
    return {"uri": uri, "ok": None, "detail": "not checked (neither an HTTP server nor SQLite)"}


def cache_folder() -> dict[str, Any]:
    from training.data.cache import cache_root

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
    from training.recipes import RECIPES

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


def diagnose(probe_budget_s: float = 15.0) -> dict[str, Any]:
    cpu = cpu_facts()
    report: dict[str, Any] = {"software": _section(software), "cpu": cpu.as_dict(), "gpu": _section(gpus)}
    report["mps"] = bool(torch.backends.mps.is_available())
    devices = [torch.device("cpu")]
    if report["gpu"].get("cuda"):
        devices.insert(0, torch.device("cuda", 0))
    report["probe"] = _section(probe, devices, probe_budget_s) if probe_budget_s > 0 else []
    report["java"] = _section(java)
    report["tracking"] = _section(tracking)
    report["cache"] = _section(cache_folder)
    report["recommendation"] = _section(recommend, cpu, report["gpu"])
    return report


def _mark(ok: Any) -> str:
    return {True: "ok", False: "PROBLEM", None: "?"}.get(ok, "?")


def format_report(report: dict[str, Any]) -> str:
    sw, cpu, gpu = report["software"], report["cpu"], report["gpu"]
    lines = [
        f"torch {sw.get('torch')} (CUDA build {sw.get('cuda_build')}, cuDNN {sw.get('cudnn')}), torchvision "
        f"{sw.get('torchvision')}, Python {sw.get('python')}, {sw.get('platform')}",
        f"CPU: {cpu['model']}, {cpu['cores']} cores, vector ISA {cpu['capability']}, avx512_bf16 {cpu['avx512_bf16']},"
        f" AMX {cpu['amx']}; native bf16 {cpu['native_bf16']} ({cpu['native_bf16_reason']})",
    ]
    if gpu.get("cuda"):
        for d in gpu["devices"]:
            lines.append(f"GPU {d['index']}: {d['name']}, {d['memory_gib']} GiB ({d['free_gib']} free), compute "
                         f"capability {d['capability']}, bf16 {d['bf16']}")  # fmt: skip
    else:
        lines.append(f"GPU: none ({gpu.get('reason', gpu.get('error'))})")
    if report["mps"]:
        lines.append("Apple MPS: available")
    probe = report["probe"]
    if isinstance(probe, list) and probe:
        lines.append(f"probe, resnet18 64x64, batch {PROBE_BATCH}, one SGD step, images/s:")
        for row in probe:
            what = row.get("images_per_s", row.get("skipped", row.get("error")))
            lines.append(f"  {row['device']:7s} {row['amp']:4s} channels_last={row['channels_last']!s:5s} {what}")
    java_, tracking_, cache = report["java"], report["tracking"], report["cache"]
    lines.append(f"Java (TorchServe): {_mark(java_.get('ok'))} {java_.get('version', java_.get('hint', ''))}")
    lines.append(f"tracking store: {_mark(tracking_.get('ok'))} {tracking_.get('uri')}: "
                 f"{tracking_.get('detail', tracking_.get('error'))}")  # fmt: skip
    lines.append(f"decoded-cache folder: {_mark(cache.get('ok'))} {cache.get('dir')}: {cache.get('free_gib')} GiB free "
                 f"({cache.get('detail', cache.get('error'))})")  # fmt: skip
    rec = report["recommendation"]
    lines.append(f"recommendation: {rec.get('line', rec.get('error'))}")
    return "\n".join(lines)


def run_doctor(*, as_json: bool, probe_budget_s: float) -> dict[str, Any]:
    report = diagnose(probe_budget_s)
    print(json.dumps(report, indent=1) if as_json else format_report(report))
    return report
