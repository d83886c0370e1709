"""Convolutions over tiny feature maps: oneDNN's kernels against one matrix product (--tiny-maps).

    .venv/bin/python bench/tiny_maps.py [--steps 8] [--batch 128]

resnet18 with the ImageNet stem at 64x64 (its last stage sees 2x2 maps), one SGD training step on
random images, images/s with the library's convolutions (`conv`) and with TinyMapConv2d (`matmul`),
in fp32 and bf16, channels_last, on this CPU as it is and restricted to AVX2 kernels (a child process
with ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2, close to an AVX2-only CPU; bf16 is left out
there: `--amp auto` never picks it on such a CPU). The per-layer split of one bf16 step is printed
first: where the time goes with the library's kernels.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from training.jobs.resnet.classifier import build_classifier  # noqa: E402
from training.jobs.resnet.tiny_maps import use_matmul_for_tiny_maps  # noqa: E402

AVX2 = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}


def images_per_second(*, matmul: bool, bf16: bool, batch: int, steps: int) -> float:
    torch.manual_seed(0)
    model = build_classifier("resnet18", 200, "imagenet", 64)
    if matmul:
        use_matmul_for_tiny_maps(model)
    model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, fused=True)
    x = torch.randn(batch, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 200, (batch,))

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    for _ in range(3):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return batch * steps / (time.perf_counter() - start)


def layer4_share(batch: int) -> float:
    """The share of a bf16 training step spent in convolutions over 2x2 maps, with the library's kernels."""
    from torch.profiler import ProfilerActivity, profile

    model = build_classifier("resnet18", 200, "imagenet", 64).to(memory_format=torch.channels_last)
    x = torch.randn(batch, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 200, (batch,))
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(3):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
    events = prof.key_averages(group_by_input_shape=True)
    total = sum(e.self_cpu_time_total for e in events)
    tiny = sum(e.self_cpu_time_total for e in events if "convolution" in e.key and e.input_shapes
               and len(e.input_shapes[0]) == 4 and e.input_shapes[0][2:] == [2, 2])  # fmt: skip
    return tiny / total


def measure(batch: int, steps: int, *, with_bf16: bool) -> dict[str, float]:
    results = {}
    for bf16 in (False, True) if with_bf16 else (False,):
        for matmul in (False, True):
            name = f"{'bf16' if bf16 else 'fp32'} {'matmul' if matmul else 'conv'}"
            results[name] = images_per_second(matmul=matmul, bf16=bf16, batch=batch, steps=steps)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.batch, args.steps, with_bf16=False)))
        return
    print(f"# {os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads; batch {args.batch}")
    print(f"convolutions over 2x2 maps, library kernels: {100 * layer4_share(args.batch):.0f}% of a bf16 step")
    kinds = {"as it is": measure(args.batch, args.steps, with_bf16=True)}
    command = [sys.executable, __file__, "--child", "--steps", str(args.steps), "--batch", str(args.batch)]
    child = subprocess.run(command, env={**os.environ, **AVX2}, capture_output=True, text=True, check=True)
    kinds["restricted to AVX2"] = json.loads(child.stdout.strip().splitlines()[-1])
    print("| CPU | precision | conv (images/s) | matmul (images/s) | speed-up |")
    print("|---|---|---|---|---|")
    for kind, results in kinds.items():
        for precision in ("fp32", "bf16"):
            if f"{precision} conv" in results:
                conv, matmul = results[f"{precision} conv"], results[f"{precision} matmul"]
                print(f"| {kind} | {precision} | {conv:.0f} | {matmul:.0f} | {matmul / conv:.2f}x |")


if __name__ == "__main__":
    main()
