"""Per-device choices made from capability facts (no such hardware needed), `dlops doctor`, the GPU
self-check's refusal, and the GPU-path fixes that can be shown on the CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO, latest_run, run_cli
from training.checkpoint import process_seed, restorable_cuda_states
from training.hardware import CpuFacts, GpuFacts, decide_native_bf16, device_class, resolve_amp
from training.jobs.resnet.data.batches import BatchTransform, TensorBatches
from training.jobs.resnet.loop import Totals, to_device
from training.jobs.resnet.recipes import RECIPES, apply_recipe

NATIVE = CpuFacts(
    model="test CPU",
    cores=8,
    capability="AVX512",
    avx512_bf16=True,
    amx=False,
    native_bf16=True,
    native_bf16_reason="the CPU has avx512_bf16",
)
AVX2 = CpuFacts(
    model="test CPU",
    cores=8,
    capability="AVX2",
    avx512_bf16=False,
    amx=False,
    native_bf16=False,
    native_bf16_reason="the CPU has neither avx512_bf16 nor AMX",
)
H100 = GpuFacts(index=0, name="H100", memory_gib=80.0, capability=(9, 0))
V100 = GpuFacts(index=0, name="V100", memory_gib=32.0, capability=(7, 0))
FAST = ["-b", "16", "-j", "0", "-p", "0", "--lr", "0.02"]


def test_auto_precision_follows_the_device_capabilities():
    assert resolve_amp("auto", "cuda", AVX2, H100).amp == "bf16"
    v100 = resolve_amp("auto", "cuda", AVX2, V100)
    assert v100.amp == "fp16" and "gradient scaler" in v100.reason and "7.0" in v100.reason
    assert resolve_amp("auto", "cpu", NATIVE).amp == "bf16"
    plain = resolve_amp("auto", "cpu", AVX2)
    assert plain.amp == "off" and "no native bf16" in plain.reason and "25x" in plain.reason
    assert plain.warning is None
    assert resolve_amp("auto", "mps", AVX2).amp == "off"
    for device, gpu in (("cpu", None), ("cuda", H100)):
        assert resolve_amp("off", device, NATIVE, gpu).amp == "off"


def test_an_explicit_slow_choice_runs_but_warns():
    slow = resolve_amp("bf16", "cpu", AVX2)
    assert slow.amp == "bf16" and "avx512_bf16 or AMX" in slow.warning and "25x slower" in slow.warning
    assert resolve_amp("bf16", "cpu", NATIVE).warning is None
    assert "no native bf16" in resolve_amp("bf16", "cuda", AVX2, V100).warning
    assert resolve_amp("fp16", "cuda", AVX2, V100).warning is None
    with pytest.raises(ValueError, match="--amp 'fp8'"):
        resolve_amp("fp8", "cpu", NATIVE)


def test_native_bf16_detection_and_its_overrides():
    assert decide_native_bf16(avx512_bf16=True, amx=False, env={}) == (True, "the CPU has avx512_bf16")
    assert decide_native_bf16(avx512_bf16=False, amx=True, env={})[0] is True
    assert decide_native_bf16(avx512_bf16=False, amx=False, env={})[0] is False
    assert decide_native_bf16(avx512_bf16=True, amx=True, env={"DLOPS_CPU_NATIVE_BF16": "0"}) == (
        False,
        "DLOPS_CPU_NATIVE_BF16=0 (override)",
    )
    assert decide_native_bf16(avx512_bf16=False, amx=False, env={"DLOPS_CPU_NATIVE_BF16": "1"})[0] is True
    limited = decide_native_bf16(avx512_bf16=True, amx=False, env={"ONEDNN_MAX_CPU_ISA": "AVX2"})
    assert limited[0] is False and "ONEDNN_MAX_CPU_ISA=AVX2" in limited[1]
    assert decide_native_bf16(avx512_bf16=True, amx=False, env={"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16"})[0] is True


def test_fast_recipe_values_per_device_class_and_explicit_options_win():
    assert device_class("cuda", AVX2) == "gpu"
    assert device_class("cpu", NATIVE) == "cpu-bf16" and device_class("cpu", AVX2) == "cpu"
    for klass in ("gpu", "cpu-bf16", "cpu"):
        values = RECIPES["fast"][klass]
        assert values["amp"] == "auto" and values["channels_last"] is True, klass
    assert RECIPES["fast"]["gpu"]["stem"] == "small"
    resolved = apply_recipe("fast", "cpu", {"lr": 0.1, "stem": "imagenet"}, {"lr": 0.05})
    assert resolved["lr"] == 0.05 and resolved["recipe_device_class"] == "cpu"
    assert resolved["batch_size"] == RECIPES["fast"]["cpu"]["batch_size"]
    assert apply_recipe("reference", "gpu", {"amp": "off"}, {})["amp"] == "off"


def dlops_env(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "training.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=REPO, env={**os.environ, **env}, timeout=600)  # fmt: skip


@pytest.mark.parametrize(("native", "amp"), [("0", "off"), ("1", "bf16")])
def test_fast_recipe_resolves_precision_from_the_cpu_and_says_why(native, amp, tiny_dataset, tmp_path, client):
    result = dlops_env("train", "resnet", tiny_dataset, "--recipe", "fast", "--epochs", "1", *FAST, "--out-dir",
                       tmp_path, "--experiment", f"test-recipe-{native}",
                       env={"DLOPS_CPU_NATIVE_BF16": native})  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run = latest_run(client, f"test-recipe-{native}")
    params, tags = run.data.params, run.data.tags
    assert params["amp"] == amp and params["amp_requested"] == "auto"
    assert params["cpu_native_bf16"] == str(native == "1")
    assert params["recipe_device_class"] == ("cpu-bf16" if native == "1" else "cpu")
    assert f"=> precision {amp}:" in result.stdout
    if native == "0":
        assert "no native bf16 on the CPU (DLOPS_CPU_NATIVE_BF16=0 (override))" in tags["amp_reason"]
        assert "25x slower" in result.stdout
    else:
        assert "native bf16" in tags["amp_reason"]


def test_explicit_bf16_without_native_support_warns_and_runs(tiny_dataset, tmp_path, client):
    result = dlops_env("train", "resnet", tiny_dataset, "--amp", "bf16", "--epochs", "1", *FAST, "--limit-train",
                       "16", "--out-dir", tmp_path, "--experiment", "test-bf16-warn",
                       env={"DLOPS_CPU_NATIVE_BF16": "0"})  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "WARNING: --amp bf16 on a CPU without native bf16" in result.stdout and "avx512_bf16" in result.stdout
    assert latest_run(client, "test-bf16-warn").data.params["amp"] == "bf16"


def test_doctor_json_names_every_part():
    output = run_cli("doctor", "--json", "--probe-seconds", "3").output
    report = json.loads(output)
    assert set(report) >= {"software", "cpu", "gpu", "mps", "java", "tracking", "jobs"}
    assert set(report["jobs"]["resnet"]) >= {"probe", "cache", "recommendation", "lines"}
    report = {**report, **report["jobs"]["resnet"]}  # the classifier's own checks
    assert report["software"]["torch"] == torch.__version__
    assert {"model", "cores", "capability", "avx512_bf16", "amx", "native_bf16"} <= set(report["cpu"])
    assert report["gpu"]["cuda"] == torch.cuda.is_available()
    assert report["probe"] and report["probe"][0]["device"] == "cpu"
    assert "images_per_s" in report["probe"][0] or "skipped" in report["probe"][0]
    assert {"ok", "uri"} <= set(report["tracking"]) and "free_gib" in report["cache"]
    assert report["recommendation"]["line"].startswith("dlops train resnet DATA --recipe fast")
    text = run_cli("doctor", "--probe-seconds", "0").output
    assert "native bf16" in text and "resnet: recommendation: dlops train resnet" in text


def test_gpu_check_refuses_cleanly_without_cuda(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is visible")
    result = subprocess.run([sys.executable, "bench/gpu_check.py", "--out", str(tmp_path)], cwd=REPO,
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 2 and "gpu-check needs a CUDA GPU" in result.stderr
    assert not (tmp_path / "gpu_check.json").exists()


def test_gpu_check_runs_every_path_on_the_cpu_in_smoke_mode(tiny_dataset, tmp_path):
    """The self-check cannot run on a GPU here; its own code must still work (toy sizes on the CPU).

    It takes the precision `--amp auto` gives the CPU: told the CPU lacks native bf16 (as an
    AVX2-only one does), every row runs in fp32, so it stays fast on any CPU."""
    result = subprocess.run([sys.executable, "bench/gpu_check.py", "--smoke-on-cpu", "--data", str(tiny_dataset),
                             "--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache")],
                            cwd=REPO, capture_output=True, text=True, timeout=900,
                            env={**os.environ, "DLOPS_CPU_NATIVE_BF16": "0"})  # fmt: skip
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    report = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert report["amp"] == "off" and "no native bf16" in report["amp_reason"]
    assert not [r for r in report["rows"] if "bf16" in r["setting"]], report["rows"]
    checks = {row["check"] for row in report["rows"]}
    assert checks == {"resident cache throughput", "--recipe fast on the real slice", "LM tokens/s", "DDP (nccl)",
                      "TorchServe on the GPU"}  # fmt: skip
    for row in report["rows"]:
        assert "FAILED" not in row["note"] and "PROBLEM" not in row["note"], row
        if row["check"] != "TorchServe on the GPU":  # skipped where Java is missing
            assert "skipped" not in row["note"], row
    compiled = [r for r in report["rows"] if r["values"].get("compiled")]
    assert compiled and all(r["values"]["recompiles"] == 0 for r in compiled), compiled


def test_input_layout_follows_the_channels_last_option():
    transform = BatchTransform("flip-crop", (0.5,) * 3, (0.25,) * 3, train=True)
    # decoded batches are H x W x 3 rows viewed as N x 3 x H x W: channels_last strides
    decoded = torch.randint(0, 256, (4, 16, 16, 3), dtype=torch.uint8).permute(0, 3, 1, 2)
    labels = torch.zeros(4, dtype=torch.long)
    cpu = torch.device("cpu")
    off, _ = to_device(decoded, labels, cpu, channels_last=False, prepare=transform)
    on, _ = to_device(decoded, labels, cpu, channels_last=True, prepare=transform)
    assert off.is_contiguous() and not off.is_contiguous(memory_format=torch.channels_last)
    assert on.is_contiguous(memory_format=torch.channels_last) and not on.is_contiguous()


def test_totals_count_in_python_and_reduce_in_one_collective():
    totals = Totals(torch.device("cpu"))
    output = torch.tensor([[2.0, 1.0, 0.0], [0.0, 1.0, 3.0]])
    totals.add(torch.tensor(0.5), output, torch.tensor([0, 1]))
    assert isinstance(totals.count, int) and totals.count == 2
    calls = []
    totals.reduce(lambda t: calls.append(t.clone()) or t * 2)  # two identical "processes"
    assert len(calls) == 1 and calls[0].tolist() == [1.0, 1.0, 2.0, 2.0]
    assert totals.averages() == (0.5, 50.0, 100.0, 4)


def test_training_shares_are_padded_to_equal_batches_and_validation_shares_are_not():
    images = torch.arange(10)
    fetch = lambda i: (images[i], images[i])  # noqa: E731
    train = [TensorBatches(fetch, 10, 2, shuffle=True, seed=0, rank=rank, world_size=3) for rank in range(3)]
    assert [len(t) for t in train] == [2, 2, 2]  # 10 samples, 3 ranks: 4 each after padding
    seen = [v for t in train for x, _ in t for v in x.tolist()]
    assert len(seen) == 12 and set(seen) == set(range(10))
    val = [
        TensorBatches(fetch, 10, 2, shuffle=False, seed=0, rank=rank, world_size=3, equal_shares=False)
        for rank in range(3)
    ]
    assert sorted(v for t in val for x, _ in t for v in x.tolist()) == list(range(10))
    dropped = TensorBatches(fetch, 10, 4, shuffle=True, drop_last=True)
    assert len(dropped) == 2 and all(len(x) == 4 for x, _ in dropped)


def test_each_rank_draws_its_own_augmentation_and_rng_restores_on_fewer_gpus():
    assert process_seed(7, 0) == 7  # a single process seeds as before
    assert len({process_seed(7, rank) for rank in range(4)}) == 4
    assert process_seed(7, 1, 3) != process_seed(7, 1, 0)
    flips = []
    for rank in range(2):
        torch.manual_seed(process_seed(0, rank))
        flips.append(torch.rand(64) < 0.5)
    assert not torch.equal(flips[0], flips[1])
    saved = [torch.full((4,), i, dtype=torch.uint8) for i in range(8)]  # a run saved on 8 GPUs
    assert [int(s[0]) for s in restorable_cuda_states(saved, 1)] == [0]
    assert len(restorable_cuda_states(saved[:1], 4)) == 1
