"""What the hardware offers (capability facts) and the precision chosen from them.

Decisions are plain functions of facts, so every branch is tested without the hardware: a test
builds `CpuFacts(native_bf16=False, ...)` or `GpuFacts(capability=(7, 0), ...)` and asks. The facts
of this machine come from `cpu_facts()` / `gpu_facts()`, which honour overrides:

    DLOPS_CPU_NATIVE_BF16=0|1   say the CPU has (1) or lacks (0) native bf16, whatever it reports
    ONEDNN_MAX_CPU_ISA=AVX2     (oneDNN's own switch) keeps oneDNN off its bf16 kernels: treated as
                                no native bf16, as on an AVX2-only CPU

This file imports only torch and the standard library: TorchServe handlers ship it in the .mar
(as dlops_hardware.py) and make the same choice on the serving machine.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

# Measured 2026-11-28, resnet18 64x64 batch 32, one SGD step: on a 2-core AVX2-only EPYC, bf16
# autocast ran 25x (imagenet stem) to 28x (small stem) slower than fp32.
CPU_BF16_SLOWDOWN = "about 25x slower than fp32"
AMP_CHOICES = ("auto", "off", "bf16", "fp16")


@dataclass(kw_only=True, frozen=True)
class CpuFacts:
    model: str
    cores: int
    capability: str  # the vector ISA torch's kernels use: AVX512, AVX2, DEFAULT...
    avx512_bf16: bool
    amx: bool
    native_bf16: bool  # bf16 matmuls/convolutions at full speed (avx512_bf16 or AMX), after overrides
    native_bf16_reason: str

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(kw_only=True, frozen=True)
class GpuFacts:
    index: int
    name: str
    memory_gib: float
    capability: tuple[int, int]  # CUDA compute capability

    @property
    def bf16(self) -> bool:
        """Native bf16 tensor cores arrived with Ampere (compute capability 8.0)."""
        return self.capability >= (8, 0)

    def as_dict(self) -> dict:
        return {**asdict(self), "capability": f"{self.capability[0]}.{self.capability[1]}", "bf16": self.bf16}


@dataclass(kw_only=True, frozen=True)
class Precision:
    """The resolved --amp value, why, and a warning when the user asked for something slow."""

    amp: str  # off | bf16 | fp16
    reason: str
    warning: str | None = None

    def describe(self) -> str:
        return f"=> precision {self.amp}: {self.reason}"


def cpu_model_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _onednn_isa_has_bf16(isa: str) -> bool:
    isa = isa.upper()
    return isa in ("ALL", "DEFAULT") or "BF16" in isa or "AMX" in isa or isa.startswith("AVX10")


def decide_native_bf16(*, avx512_bf16: bool, amx: bool, env: dict[str, str]) -> tuple[bool, str]:
    """Whether bf16 runs at full speed on this CPU, and why; `env` may override (tests, emulation)."""
    override = env.get("DLOPS_CPU_NATIVE_BF16", "").strip()
    if override in ("0", "1"):
        return override == "1", f"DLOPS_CPU_NATIVE_BF16={override} (override)"
    isa = env.get("ONEDNN_MAX_CPU_ISA", "").strip()
    if isa and not _onednn_isa_has_bf16(isa):
        return False, f"ONEDNN_MAX_CPU_ISA={isa} keeps oneDNN off its bf16 kernels"
    if amx:
        return True, "the CPU has AMX"
    if avx512_bf16:
        return True, "the CPU has avx512_bf16"
    return False, "the CPU has neither avx512_bf16 nor AMX"


def cpu_facts(env: dict[str, str] | None = None) -> CpuFacts:
    env = dict(os.environ) if env is None else env
    avx512_bf16 = bool(torch.cpu._is_avx512_bf16_supported())
    amx = bool(torch.cpu._is_amx_tile_supported())
    native, reason = decide_native_bf16(avx512_bf16=avx512_bf16, amx=amx, env=env)
    capability = torch.backends.cpu.get_cpu_capability()
    return CpuFacts(
        model=cpu_model_name(),
        cores=usable_cores(),
        capability=capability,
        avx512_bf16=avx512_bf16,
        amx=amx,
        native_bf16=native,
        native_bf16_reason=reason,
    )


def gpu_facts(index: int) -> GpuFacts:
    props = torch.cuda.get_device_properties(index)
    return GpuFacts(
        index=index,
        name=props.name,
        memory_gib=round(props.total_memory / 2**30, 1),
        capability=(props.major, props.minor),
    )


def resolve_amp(requested: str, device_type: str, cpu: CpuFacts, gpu: GpuFacts | None = None) -> Precision:
    """--amp auto|off|bf16|fp16 on this device -> the precision to train (or serve) in.

    auto: a GPU with bf16 -> bf16; an older GPU -> fp16 (with a gradient scaler); a CPU with native
    bf16 -> bf16; any other CPU (or MPS) -> fp32. An explicit choice is kept, with a warning where
    the hardware makes it slow.
    """
    if requested not in AMP_CHOICES:
        raise ValueError(f"--amp {requested!r} is not one of {', '.join(AMP_CHOICES)}")
    if requested == "off":
        return Precision(amp="off", reason="fp32 (--amp off)")
    if device_type == "cuda":
        assert gpu is not None, "a CUDA device needs its GpuFacts"
        where = f"{gpu.name} (compute capability {gpu.capability[0]}.{gpu.capability[1]})"
        if requested == "auto":
            if gpu.bf16:
                return Precision(amp="bf16", reason=f"auto: {where} has native bf16")
            return Precision(
                amp="fp16", reason=f"auto: {where} predates bf16 (Ampere, 8.0): fp16 with a gradient scaler"
            )
        if requested == "bf16" and not gpu.bf16:
            return Precision(
                amp="bf16",
                reason="--amp bf16",
                warning=f"{where} has no native bf16: it is emulated and slow; "
                "--amp fp16 (or auto) uses its tensor cores",
            )
        return Precision(amp=requested, reason=f"--amp {requested}")
    if device_type == "cpu":
        if requested == "auto":
            if cpu.native_bf16:
                return Precision(amp="bf16", reason=f"auto: native bf16 on the CPU ({cpu.native_bf16_reason})")
            return Precision(
                amp="off", reason=f"auto: fp32, no native bf16 on the CPU ({cpu.native_bf16_reason}); bf16 would run "
                f"{CPU_BF16_SLOWDOWN}"
            )  # fmt: skip
        if requested == "bf16" and not cpu.native_bf16:
            return Precision(amp="bf16", reason="--amp bf16", warning=f"--amp bf16 on a CPU without native bf16 "
                             f"({cpu.native_bf16_reason}; avx512_bf16 or AMX is missing): expect it to run "
                             f"{CPU_BF16_SLOWDOWN}; --amp auto picks fp32 here")  # fmt: skip
        if requested == "fp16":
            return Precision(
                amp="fp16",
                reason="--amp fp16",
                warning="--amp fp16 on a CPU: no fused fp16 kernels for training "
                "here, expect it to be slower than fp32",
            )
        return Precision(amp=requested, reason=f"--amp {requested}")
    # MPS and other devices: autocast is not tuned here
    if requested == "auto":
        return Precision(amp="off", reason=f"auto: fp32 on {device_type}")
    return Precision(amp=requested, reason=f"--amp {requested}")


def device_class(device_type: str, cpu: CpuFacts) -> str:
    """The class a recipe is tuned for: gpu, cpu-bf16 (native bf16) or cpu."""
    if device_type in ("cuda", "mps"):
        return "gpu"
    return "cpu-bf16" if cpu.native_bf16 else "cpu"
