"""Multi-process training through torchrun: process-group set-up, reductions, the launcher call.

`dlops train resnet --nproc-per-node N` runs `python -m torch.distributed.run --standalone` (torchrun)
on `training.trainer` with the resolved options in a JSON file. Several machines use torchrun
directly: `torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500
-m training.cli train resnet DATA ...`. Either way every process finds WORLD_SIZE, RANK and
LOCAL_RANK in its environment, as torchrun sets them.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from serving.secrets import child_environment


@dataclass(kw_only=True, frozen=True)
class ProcessGroup:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        """Wait until every process gets here (e.g. until rank 0 has built a shared file)."""
        if self.enabled:
            dist.barrier()

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Element-wise sum over all processes (metric totals)."""
        if self.enabled:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor


def under_torchrun() -> bool:
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_process_group(device: torch.device) -> ProcessGroup:
    """Join the group torchrun set up (nccl on GPUs, gloo on CPUs); a single process otherwise."""
    if not under_torchrun() or int(os.environ["WORLD_SIZE"]) == 1:
        return ProcessGroup()
    group = ProcessGroup(
        rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]), local_rank=int(os.environ["LOCAL_RANK"])
    )
    if device.type == "cuda":
        gpu = torch.device("cuda", group.local_rank)
        torch.cuda.set_device(gpu)
        # device_id binds this process to its GPU at once (NCCL eager init; no guessing of the device)
        dist.init_process_group("nccl", device_id=gpu)
    else:
        dist.init_process_group("gloo")
    if not group.is_main:  # one console: rank 0 speaks for all
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - lives as long as the process
    return group


def close_process_group(group: ProcessGroup) -> None:
    if group.enabled and dist.is_initialized():
        dist.destroy_process_group()


class TooManyProcesses(ValueError):
    """More processes than the machine has cores (CPU) or GPUs (CUDA): refused unless insisted on."""


def check_process_count(processes: int, device: str, *, insist: bool) -> None:
    """Refuse more training processes than the device can hold one each of: on the CPU its usable
    cores (each process also starts data workers and holds a model copy: 64 processes on 2 cores
    exhausted 24 GiB), on CUDA the visible GPUs (nccl needs one per process)."""
    from training.hardware import usable_cores

    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    limit, what = (torch.cuda.device_count(), "visible GPUs") if cuda else (usable_cores(), "usable CPU cores")
    if processes > limit and not insist:
        raise TooManyProcesses(f"--nproc-per-node {processes} is more than the {limit} {what}: each process holds "
                               f"a copy of the model and its own data workers. Use at most {limit}, or add "
                               "--allow-oversubscribe to start them anyway")  # fmt: skip


def launch(kind: str, config: Any, nproc_per_node: int, resume: Path | None = None) -> int:
    """Run job `kind` with `config` in nproc_per_node processes through torchrun (training.trainer's main)."""
    with tempfile.TemporaryDirectory() as tmp:
        config_file = Path(tmp) / "config.json"
        config_file.write_text(json.dumps(asdict(config)), encoding="utf-8")
        command = [
            sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc_per_node}",
            "-m", "training.trainer", "--job", kind, "--config", str(config_file),
        ]  # fmt: skip
        if resume:
            command += ["--resume", str(resume)]
        print(f"=> launching {nproc_per_node} processes with torchrun: {' '.join(command[1:])}", flush=True)
        process = subprocess.Popen(command, env=child_environment("training"))
        # SIGTERM (docker stop, Kubernetes, SLURM) reaches this launcher only: pass it on, so that torchrun
        # stops every worker the graceful way (training/stopping.py); exit as a stopped run does (143)
        received: list[int] = []

        def forward(signum: int, frame: object) -> None:
            received.append(signum)
            process.send_signal(signal.SIGTERM)

        previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            code = process.wait()
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
        return 128 + received[0] if received else code
