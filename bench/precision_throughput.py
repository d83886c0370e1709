"""Training images/s of resnet18 64x64 in fp32, bf16 and the `--amp auto` choice, both stems, with and
without channels_last, on each kind of CPU this machine can act as. One run, one table.

Run by hand (not a test):

    .venv/bin/python bench/precision_throughput.py [--kinds native,avx2] [--seconds 4] [-b 32]

Kinds: `native` is this CPU as it is; `avx2` restricts torch and oneDNN to AVX2 kernels
(ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2), close to an AVX2-only laptop or cloud VM.
Each kind runs in its own process (the variables are read when torch loads). A figure is one SGD
step (forward, backward, update) on random tensors, repeated for --seconds after one warm-up step
(training.jobs.resnet.doctor.training_step_rate, the same timing `dlops doctor` probes with).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

KINDS = {"native": {}, "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}}


def measure(batch: int, seconds: float, threads: int | None) -> dict:
    """Run in the child process: every (stem, precision, channels_last) figure for this CPU kind."""
    import torch

    from training.hardware import cpu_facts, resolve_amp
    from training.jobs.resnet.doctor import training_step_rate

    if threads:
        torch.set_num_threads(threads)
    cpu = cpu_facts()
    auto = resolve_amp("auto", "cpu", cpu)
    rows = []
    for stem in ("imagenet", "small"):
        for amp in ("off", "bf16"):
            for channels_last in (False, True):
                rate = training_step_rate(
                    torch.device("cpu"), amp, channels_last=channels_last, stem=stem, batch=batch, seconds=seconds
                )
                row = {"stem": stem, "amp": amp, "channels_last": channels_last, "images_per_s": round(rate, 1)}
                rows.append(row)
                print(f"  {stem:8s} {amp:4s} channels_last={channels_last!s:5s} {rate:7.1f} img/s", file=sys.stderr)
    return {"cpu": cpu.as_dict(), "auto": auto.amp, "auto_reason": auto.reason, "rows": rows}


def table(results: dict[str, dict]) -> str:
    lines = [
        "| CPU kind | stem | fp32 | fp32 + CL | bf16 | bf16 + CL | bf16/fp32 (CL) | CL gain fp32 / bf16 | auto picks |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for kind, result in results.items():
        for stem in ("imagenet", "small"):
            rate = {(r["amp"], r["channels_last"]): r["images_per_s"] for r in result["rows"] if r["stem"] == stem}
            lines.append(
                f"| {kind} | {stem} | {rate[('off', False)]} | {rate[('off', True)]} | {rate[('bf16', False)]} | "
                f"{rate[('bf16', True)]} | {rate[('bf16', True)] / rate[('off', True)]:.2f}x | "
                f"{rate[('off', True)] / rate[('off', False)]:.2f}x / "
                f"{rate[('bf16', True)] / rate[('bf16', False)]:.2f}x"
                f" | {result['auto']} ({rate[(result['auto'], True)]} img/s with CL) |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kinds", default="native,avx2", help=f"comma-separated: {', '.join(KINDS)}")
    parser.add_argument("--seconds", type=float, default=4.0, help="timed seconds per figure")
    parser.add_argument("-b", "--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.batch_size, args.seconds, args.threads)))
        return
    results = {}
    for kind in args.kinds.split(","):
        print(f"=> {kind}: {KINDS[kind] or 'no overrides'}", file=sys.stderr, flush=True)
        command = [sys.executable, __file__, "--child", "--seconds", str(args.seconds), "-b", str(args.batch_size)]
        if args.threads:
            command += ["--threads", str(args.threads)]
        out = subprocess.run(command, env={**os.environ, **KINDS[kind]}, check=True, capture_output=True, text=True)
        sys.stderr.write(out.stderr)
        results[kind] = json.loads(out.stdout.strip().splitlines()[-1])
    first = next(iter(results.values()))["cpu"]
    print(f"# {first['model']}, {first['cores']} cores; batch {args.batch_size}, one SGD step per figure, "
          f"{args.seconds:g} s each; CL = channels_last")  # fmt: skip
    for kind, result in results.items():
        cpu = result["cpu"]
        print(f"# {kind}: torch ISA {cpu['capability']}, native bf16 {cpu['native_bf16']} ({cpu['native_bf16_reason']})"
              f"; auto -> {result['auto']}: {result['auto_reason']}")  # fmt: skip
    print(table(results))
    print(json.dumps(results))


if __name__ == "__main__":
    main()
