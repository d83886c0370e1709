"""`dlops doctor`: what this machine offers the project, and each job's own checks on it (the ResNet's:
a short speed probe, room for its decoded cache, and the options it recommends here).

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
import urllib.request
from pathlib import Path
from typing import Any

import torch

from training.hardware import cpu_facts, gpu_facts
from training.jobs import jobs
from training.jobs.spec import Machine


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


def diagnose(probe_budget_s: float = 15.0) -> dict[str, Any]:
    """The machine's facts, then each installed job's own checks (a speed probe, what its data needs,
    the options it recommends here), each gathered on its own."""
    cpu = cpu_facts()
    report: dict[str, Any] = {"software": _section(software), "cpu": cpu.as_dict(), "gpu": _section(gpus)}
    report["mps"] = bool(torch.backends.mps.is_available())
    report["java"] = _section(java)
    report["tracking"] = _section(tracking)
    machine = Machine(cpu=cpu, gpu=report["gpu"], probe_budget_s=probe_budget_s)
    report["jobs"] = {kind: _section(job.doctor, machine) for kind, job in jobs().items() if job.doctor}
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
    java_, tracking_ = report["java"], report["tracking"]
    lines.append(f"Java (TorchServe): {_mark(java_.get('ok'))} {java_.get('version', java_.get('hint', ''))}")
    lines.append(f"tracking store: {_mark(tracking_.get('ok'))} {tracking_.get('uri')}: "
                 f"{tracking_.get('detail', tracking_.get('error'))}")  # fmt: skip
    for kind, checks in report["jobs"].items():
        lines += [f"{kind}: {line}" for line in checks.get("lines", [checks.get("error")])]
    return "\n".join(lines)


def run_doctor(*, as_json: bool, probe_budget_s: float) -> dict[str, Any]:
    report = diagnose(probe_budget_s)
    print(json.dumps(report, indent=1) if as_json else format_report(report))
    return report
