"""Training in several processes and on several machines through torchrun: the nodes, the launcher
call, process-group set-up, reductions, and what a lost peer looks like.

`dlops train resnet --nproc-per-node N` runs `python -m torch.distributed.run --standalone` (torchrun)
on `training.trainer` with the resolved options in a JSON file. Several machines ("nodes") run the
same command on each, with `--nnodes 2 --rdzv-endpoint HOST:PORT` (or in a Slurm or SkyPilot job,
whose environment says both): torchrun's c10d rendezvous gathers them, `--max-restarts` restarts the
group after a process or a node is lost, and the restarted processes find the run again by the
rendezvous id (training/trainer.py). Every process finds WORLD_SIZE, RANK and LOCAL_RANK in its
environment, as torchrun sets them.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from serving import environment
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

    def broadcast(self, value: Any) -> Any:
        """Rank 0's `value` on every process (a path, a run id: small picklable objects)."""
        if not self.enabled:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    @property
    def node_leader(self) -> bool:
        """The first process of its node (what is done once per machine)."""
        return self.local_rank == 0


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


RDZV_PORT = 29500  # torchrun's usual rendezvous port, where a scheduler's environment gives only hosts ($MASTER_PORT)


@dataclass(frozen=True, kw_only=True)
class Nodes:
    """How this machine meets the others: torchrun's c10d rendezvous, the same on every node."""

    nnodes: str  # "2", or "1:2" (go on with fewer after a loss)
    endpoint: str  # HOST:PORT; the node at HOST hosts the rendezvous and must stay up
    run_id: str  # the job's id: restarted processes find their run by it
    max_restarts: int
    join_timeout_s: int
    source: str  # where the figures came from: the options, Slurm or SkyPilot

    def torchrun_options(self) -> list[str]:
        return [f"--nnodes={self.nnodes}", "--rdzv-backend=c10d", f"--rdzv-endpoint={self.endpoint}",
                f"--rdzv-id={self.run_id}", f"--max-restarts={self.max_restarts}",
                f"--rdzv-conf=join_timeout={self.join_timeout_s}"]  # fmt: skip

    def params(self) -> dict[str, str]:
        """The run's params of its nodes as resolved (its options say what was given)."""
        return {"rendezvous": f"c10d {self.endpoint} id {self.run_id} ({self.source})"}

    def describe(self) -> str:
        return (f"{self.nnodes} nodes meeting at {self.endpoint} (rendezvous id {self.run_id}, from {self.source}; "
                f"up to {self.max_restarts} restarts)")  # fmt: skip


def first_slurm_host(nodelist: str) -> str:
    """The first host of a Slurm node list: `node[03-04,07],gpu9` -> node03 (what `scontrol show hostnames`
    prints first; scontrol is not on every node that runs a job step)."""
    head = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not head:
        raise ValueError(f"SLURM_JOB_NODELIST {nodelist!r} names no host")
    prefix, ranges = head.groups()
    return prefix + (re.split(r"[-,]", ranges)[0] if ranges else "")


def scheduler_nodes(environ: dict[str, str]) -> dict[str, str] | None:
    """What a Slurm job step or a SkyPilot task says about its nodes: nnodes, the first node's host, run_id, source."""
    if int(environ.get("SLURM_NNODES", environ.get("SLURM_JOB_NUM_NODES", "1"))) > 1 and "SLURM_JOB_ID" in environ:
        nodelist = environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST", "")
        return {"nnodes": environ.get("SLURM_NNODES") or environ["SLURM_JOB_NUM_NODES"],
                "host": first_slurm_host(nodelist), "run_id": f"slurm-{environ['SLURM_JOB_ID']}",
                "source": "Slurm"}  # fmt: skip
    if int(environ.get("SKYPILOT_NUM_NODES", "1")) > 1:
        head = environ.get("SKYPILOT_NODE_IPS", "").split()
        if not head:
            raise ValueError("SKYPILOT_NUM_NODES is above 1 but SKYPILOT_NODE_IPS names no node")
        return {"nnodes": environ["SKYPILOT_NUM_NODES"], "host": head[0],
                "run_id": f"skypilot-{environ.get('SKYPILOT_TASK_ID', 'task')}", "source": "SkyPilot"}  # fmt: skip
    return None


def resolve_nodes(config: Any, kind: str, environ: dict[str, str] | None = None) -> Nodes | None:
    """The nodes of a run: its options first (--nnodes, --rdzv-endpoint, --rdzv-id), then what Slurm's or
    SkyPilot's environment says; None for one machine."""
    environ = dict(os.environ if environ is None else environ)
    found = scheduler_nodes(environ) or {}
    port = environ.get("MASTER_PORT", RDZV_PORT)
    nnodes = config.nnodes if config.nnodes != "1" else found.get("nnodes", "1")
    if nnodes == "1" and not config.rdzv_endpoint:
        return None
    endpoint = config.rdzv_endpoint or (f"{found['host']}:{port}" if found else None)
    if not endpoint:
        raise ValueError(f"--nnodes {nnodes}: give --rdzv-endpoint HOST:PORT, a node every node reaches (it hosts "
                         "the rendezvous)")  # fmt: skip
    if ":" not in endpoint:
        endpoint = f"{endpoint}:{port}"
    given = config.nnodes != "1" or config.rdzv_endpoint
    return Nodes(nnodes=nnodes, endpoint=endpoint, run_id=config.rdzv_id or found.get("run_id") or f"dlops-{kind}",
                 max_restarts=config.max_restarts, join_timeout_s=config.rdzv_timeout,
                 source="the options" if given else found["source"])  # fmt: skip


def launched_nodes() -> Nodes | None:
    """The nodes the launcher resolved for this process (None: one machine, or torchrun started directly)."""
    given = os.environ.get(environment.NODES)
    return Nodes(**json.loads(given)) if given else None


def node_id() -> str:
    """This machine's name in a run's system metrics (system/NODE/...): MLflow's MLFLOW_SYSTEM_METRICS_NODE_ID
    when set, else the host name."""
    return os.environ.get(environment.SYSTEM_METRICS_NODE_ID) or socket.gethostname()


def rendezvous_id() -> str | None:
    """The rendezvous id torchrun gave this process's group (the same on every node and after restarts)."""
    return os.environ.get("TORCHELASTIC_RUN_ID") if under_torchrun() else None


def topology() -> dict[str, int]:
    """Nodes x processes of this group (torchrun's GROUP_WORLD_SIZE and LOCAL_WORLD_SIZE)."""
    return {"nodes": int(os.environ.get("GROUP_WORLD_SIZE", "1")),
            "processes_per_node": int(os.environ.get("LOCAL_WORLD_SIZE", "1"))}  # fmt: skip


# what gloo and NCCL say when a peer process (or its whole machine) is gone
PEER_LOST = re.compile(r"gloo/transport|Connection (closed|reset) by peer|NCCL communicator was aborted|"
                       r"ncclRemoteError|Broken pipe")  # fmt: skip


def peer_lost(error: BaseException) -> bool:
    """Whether `error`, raised by a collective, means another process or node died (rather than a bug here)."""
    return isinstance(error, dist.DistError) or (isinstance(error, RuntimeError) and bool(PEER_LOST.search(str(error))))


def launch(kind: str, config: Any, nproc_per_node: int, resume: Path | None = None, nodes: Nodes | None = None) -> int:
    """Run job `kind` with `config` in nproc_per_node processes through torchrun (training.trainer's main):
    on this machine alone (--standalone), or as one of `nodes`."""
    with tempfile.TemporaryDirectory() as tmp:
        config_file = Path(tmp) / "config.json"
        config_file.write_text(json.dumps(asdict(config)), encoding="utf-8")
        where = nodes.torchrun_options() if nodes else ["--standalone"]
        command = [
            sys.executable, "-m", "torch.distributed.run", *where, f"--nproc-per-node={nproc_per_node}",
            "-m", "training.trainer", "--job", kind, "--config", str(config_file),
        ]  # fmt: skip
        if resume:
            command += ["--resume", str(resume)]
        print(f"=> launching {nproc_per_node} processes with torchrun: {' '.join(command[1:])}", flush=True)
        env = child_environment("training")
        if nodes:
            print(f"=> this machine is one of {nodes.describe()}", flush=True)
            # torchrun 2.14 reuses the first round's store address on a node that was not rank 0 then: after a
            # node is replaced, the new round's rank 0 waits for a key nobody writes. A store per round is safe.
            env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
            env[environment.NODES] = json.dumps(asdict(nodes))
        return _run_forwarding_signals(command, env)


def _run_forwarding_signals(command: list[str], env: dict[str, str]) -> int:
    process = subprocess.Popen(command, env=env)
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
