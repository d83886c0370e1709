"""Choose the device a job runs on, say why, and never fall back to the CPU silently."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field

import torch

from training.hardware import CpuFacts, GpuFacts, Precision, cpu_facts, gpu_facts, resolve_amp

AMP_DTYPES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class DeviceError(RuntimeError):
    """The requested device cannot be used; the message says why."""


@dataclass(kw_only=True, frozen=True)
class DeviceChoice:
    device: torch.device
    reason: str
    cpu: CpuFacts = field(default_factory=cpu_facts)

    @property
    def gpu(self) -> GpuFacts | None:
        return gpu_facts(self.device.index or 0) if self.device.type == "cuda" else None

    def precision(self, requested: str) -> Precision:
        """Resolve --amp (auto, off, bf16, fp16) for this device from its capability facts."""
        return resolve_amp(requested, self.device.type, self.cpu, self.gpu)

    @property
    def name(self) -> str:
        """Human-readable hardware name, logged as a run tag."""
        if self.device.type == "cuda":
            return torch.cuda.get_device_name(self.device)
        if self.device.type == "mps":
            return "Apple MPS"
        return f"CPU ({torch.backends.cpu.get_cpu_capability()}, {os.cpu_count()} cores)"

    def features(self) -> dict[str, str]:
        """What the hardware offers the run (logged as params): vector ISA, native bf16, AMX, GPU."""
        features = {
            "cpu_capability": self.cpu.capability,
            "cpu_avx512_bf16": str(self.cpu.avx512_bf16),
            "cpu_amx": str(self.cpu.amx),
            "cpu_native_bf16": str(self.cpu.native_bf16),
        }
        gpu = self.gpu
        if gpu is not None:
            features["gpu_compute_capability"] = gpu.as_dict()["capability"]
            features["gpu_bf16"] = str(gpu.bf16)
        return features

    def describe(self) -> str:
        return f"=> using device {self.device} [{self.name}]: {self.reason}"


def explain_cuda_unusable(cuda_version: str | None, device_count: int, index: int | None) -> str | None:
    """Why a CUDA device cannot be used, or None when it can.

    Kept free of torch calls so that every branch is testable on any machine.
    """
    if cuda_version is None:
        return (
            f"--device cuda was requested but this torch build ({torch.__version__}) has no CUDA "
            "support (torch.version.cuda is None). Install a CUDA build of torch, or use --device cpu."
        )
    if device_count == 0:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        hint = f" CUDA_VISIBLE_DEVICES={visible!r}." if visible is not None else ""
        return (
            f"--device cuda was requested and torch is built with CUDA {cuda_version}, but no CUDA "
            f"device is visible (no GPU, or the driver is missing).{hint} Use --device cpu to run on the CPU."
        )
    if index is not None and index >= device_count:
        return f"--device cuda:{index} was requested but only {device_count} CUDA device(s) are visible."
    return None


def choose_device(spec: str = "auto") -> DeviceChoice:
    """Resolve 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps' into a usable device."""
    spec = spec.strip().lower()
    if spec == "auto":
        if torch.cuda.is_available():
            return DeviceChoice(device=torch.device("cuda", 0), reason="auto: a CUDA device is available")
        if torch.backends.mps.is_available():
            return DeviceChoice(device=torch.device("mps"), reason="auto: Apple MPS is available")
        why = "torch has no CUDA support" if torch.version.cuda is None else "no CUDA device is visible"
        return DeviceChoice(device=torch.device("cpu"), reason=f"auto: {why}, using the CPU")
    if spec == "cpu":
        return DeviceChoice(device=torch.device("cpu"), reason="requested with --device cpu")
    if spec == "mps":
        if not torch.backends.mps.is_available():
            raise DeviceError("--device mps was requested but Apple MPS is not available on this machine.")
        return DeviceChoice(device=torch.device("mps"), reason="requested with --device mps")
    if spec == "cuda" or spec.startswith("cuda:"):
        index = None
        if ":" in spec:
            suffix = spec.split(":", 1)[1]
            if not suffix.isdigit():
                raise DeviceError(f"--device {spec!r}: expected cuda:N with N a GPU index")
            index = int(suffix)
        count = torch.cuda.device_count() if torch.version.cuda is not None else 0
        problem = explain_cuda_unusable(torch.version.cuda, count, index)
        if problem:
            raise DeviceError(problem)
        if index:  # kernels and allocations go to cuda:N without naming it each time
            torch.cuda.set_device(index)
        return DeviceChoice(device=torch.device("cuda", index or 0), reason=f"requested with --device {spec}")
    raise DeviceError(f"--device {spec!r} is not one of auto, cpu, cuda, cuda:N, mps")


def autocast(device: torch.device, amp: str) -> contextlib.AbstractContextManager:
    """Autocast context for --amp off|bf16|fp16 on this device."""
    dtype = AMP_DTYPES[amp]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def grad_scaler(device: torch.device, amp: str) -> torch.amp.GradScaler:
    """A gradient scaler, enabled only where fp16 needs one (bf16 has fp32's range)."""
    return torch.amp.GradScaler(device.type, enabled=amp == "fp16" and device.type in ("cuda", "cpu"))


def configure_backend(device: torch.device) -> None:
    """Per-device settings for training at fixed input shapes."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # pick the fastest convolution algorithm once per shape
        torch.set_float32_matmul_precision("high")  # TF32 tensor cores for fp32 matmuls (Ampere+)


def default_print_freq(device: torch.device) -> int:
    """Batches between console lines: each line reads metrics back (a GPU sync), so fewer on GPUs."""
    return 100 if device.type == "cuda" else 10


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work so that wall-clock timings are honest."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
