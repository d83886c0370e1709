"""Training across machines: separate process sessions stand for nodes on loopback (each with its own
cache folder and system-metrics node id), meeting through torchrun's c10d rendezvous; one is SIGKILLed
mid-epoch, every process of it, and replaced; the Slurm script and the SkyPilot task of
docs/training.md run as written; a node without the data says so at once."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import psutil
import pytest
import yaml

from serving import environment
from tests.conftest import REPO, cli_error, free_port, metric_steps
from training.distributed import first_slurm_host, resolve_nodes
from training.jobs.resnet import ResNetConfig
from training.tracking.artifacts import NODE_METRICS

FAST = ["-b", "8", "-j", "0", "--lr", "0.02"]
DOCS = REPO / "docs" / "training.md"
CPU = "system/{node}/cpu_utilization_percentage"


class Node:
    """One machine: `dlops ARGS` in a session of its own, its output in a file. One thread each: two
    2-thread processes on this machine's 2 cores ran 7x slower than two of one (bench/ddp_scaling.py)."""

    def __init__(self, name: str, args: list, *, log: Path, env: dict[str, str]):
        self.name, self.log = name, log
        env = {**os.environ, "PYTHONUNBUFFERED": "1", environment.SYSTEM_METRICS_NODE_ID: name,
               "OMP_NUM_THREADS": "1", **env}  # fmt: skip
        with log.open("w") as out:
            self.process = subprocess.Popen([sys.executable, "-m", "training.cli", *map(str, args)], stdout=out,
                                            stderr=subprocess.STDOUT, env=env, cwd=REPO,
                                            start_new_session=True)  # fmt: skip

    @property
    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def kill(self) -> None:
        """SIGKILL every process of the node at once (launcher, torchrun's agent, workers): a machine dies."""
        root = psutil.Process(self.process.pid)
        for process in [root, *root.children(recursive=True)]:
            process.kill()
        self.process.wait(timeout=30)

    def finish(self, timeout_s: float) -> str:
        try:
            code = self.process.wait(timeout=timeout_s)
        finally:
            if self.process.poll() is None:
                self.kill()
        assert code == 0, f"{self.name} exited {code}:\n{self.output[-4000:]}"
        return self.output


def first_to_print(nodes: list[Node], needle: str, timeout_s: float = 240) -> Node:
    """The node whose output first holds `needle` (rank 0 prints for the group: either node may be it); none may
    exit before."""
    deadline = time.monotonic() + timeout_s
    while not (printed := [node for node in nodes if needle in node.output]):
        said = "".join(f"{node.name}:\n{node.output[-2000:]}\n" for node in nodes)
        assert all(node.process.poll() is None for node in nodes), f"a node exited before {needle!r}:\n{said}"
        assert time.monotonic() < deadline, f"no node printed {needle!r}:\n{said}"
        time.sleep(0.2)
    return printed[0]


def listening(port: int, node: Node, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while not any(c.laddr.port == port and c.status == psutil.CONN_LISTEN for c in psutil.net_connections("tcp")):
        assert node.process.poll() is None and time.monotonic() < deadline, node.output[-3000:]
        time.sleep(0.2)


def the_run(client, experiment: str):
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert len(runs) == 1, "one MLflow run for the whole job, whatever the nodes"
    return runs[0]


def steps_once(client, run_id: str, metric: str) -> list[int]:
    steps = [m.step for m in client.get_metric_history(run_id, metric)]
    assert not [s for s, n in Counter(steps).items() if n > 1], f"{metric} logged twice at a step: {sorted(steps)}"
    return sorted(steps)


def test_two_nodes_one_killed_mid_epoch_and_replaced_the_run_resumes_and_finishes(tiny_dataset, tmp_path, client):
    port, out = free_port(), tmp_path / "shared-runs"
    endpoint = f"127.0.0.1:{port}"
    args = ["train", "resnet", tiny_dataset, *FAST, "-p", "1", "--epochs", "2", "--nnodes", "2", "--rdzv-endpoint",
            endpoint, "--rdzv-id", "nodes-test", "--rdzv-timeout", "120", "--checkpoint-every", "0.5",
            "--out-dir", out, "--experiment", "test-nodes"]  # fmt: skip

    def start(name: str, attempt: str = "") -> Node:
        return Node(name, args, log=tmp_path / f"{name}{attempt}.log", env={"DLOPS_CACHE_DIR": str(tmp_path / name)})

    first = start("node-a")  # its agent hosts the rendezvous store (on one host, the first to bind the port)
    listening(port, first)
    second = start("node-b")
    rank0 = first_to_print([first, second], "MLflow run")  # both joined; rank 0 (either) opened the run
    first_to_print([rank0], "Epoch: [2][3/6]")
    second.kill()
    replacement = start("node-b", "-replacement")  # the scheduler restarts the lost node
    said = first.finish(300)
    replacement.finish(60)

    run = the_run(client, "test-nodes")
    tags, params = run.data.tags, run.data.params
    assert run.info.status == "FINISHED" and tags["stop_reason"] == "completed 2 epochs"
    assert tags["restarts"] == "1" and "epoch 2" in tags["resumed_at"]
    assert (params["nodes"], params["processes_per_node"], params["world_size"]) == ("2", "1", "2")
    assert params["rendezvous"] == f"c10d {endpoint} id nodes-test (the options)"
    if rank0 is first:  # the survivor held the run: it says what it lost, and resumes it
        assert tags["node_lost"].startswith("in epoch 2: ") and "resumable from" in said
        assert "rendezvous nodes-test: the process group was restarted; resuming its run" in said
    for metric in ("train/loss", "val/acc1", "lr"):
        assert steps_once(client, run.info.run_id, metric) == [1, 2], metric
    for node in ("node-a", "node-b"):
        assert len(steps_once(client, run.info.run_id, CPU.format(node=node))) >= 2, node
        # the decoded cache: one per node (its own folder), nothing half-built, found again by the replacement
        assert len([p for p in (tmp_path / node).glob("*-train-*") if p.is_dir()]) == 1, node
        assert not list((tmp_path / node).glob("*partial*")), node
    assert "decoding train" in second.output and "decoding train" not in replacement.output
    assert {p.name for p in (out / run.info.run_id / NODE_METRICS).iterdir()} == {"node-a", "node-b"}


def test_a_node_lost_for_good_leaves_the_run_killed_with_the_way_to_resume(tiny_dataset, tmp_path, client):
    port, out = free_port(), tmp_path / "shared-runs"
    args = ["train", "resnet", tiny_dataset, *FAST, "-p", "1", "--epochs", "2", "--nnodes", "2", "--rdzv-endpoint",
            f"127.0.0.1:{port}", "--rdzv-id", "lost-for-good", "--rdzv-timeout", "15", "--checkpoint-every", "0.5",
            "--out-dir", out, "--experiment", "test-nodes-lost"]  # fmt: skip
    first = Node("node-a", args, log=tmp_path / "a.log", env={})
    listening(port, first)
    second = Node("node-b", args, log=tmp_path / "b.log", env={})
    first_to_print([first, second], "Epoch: [1][3/6]")
    second.kill()  # and no replacement comes: the survivor waits --rdzv-timeout at the rendezvous, then gives up
    assert first.process.wait(timeout=240) != 0
    run = the_run(client, "test-nodes-lost")
    last = out / run.info.run_id / "last.pt"
    assert run.info.status == "KILLED", first.output[-3000:]
    assert run.data.tags["stop_reason"] == (f"the node group gave up after losing a node; resumable from {last}: the "
                                            "same command on every node (the same --rdzv-id lost-for-good) "
                                            "continues the run")  # fmt: skip
    assert f"=> the node group gave up; run {run.info.run_id} ended KILLED" in first.output


def slurm_script() -> tuple[int, list[list[str]]]:
    """docs/training.md's Slurm batch script: its node count and the commands its `srun` lines run."""
    script = next(b for lang, b in code_blocks() if lang == "bash" and b.startswith("#!/bin/bash\n#SBATCH"))
    nodes = int(re.search(r"^#SBATCH --nodes=(\d+)$", script, re.MULTILINE).group(1))
    commands = [shlex.split(line)[1:] for line in joined_lines(script) if line.startswith("srun ")]
    return nodes, commands


def skypilot_task() -> tuple[int, list[list[str]]]:
    task = yaml.safe_load(next(b for lang, b in code_blocks() if lang == "yaml" and "num_nodes:" in b))
    return task["num_nodes"], [shlex.split(line) for line in joined_lines(task["run"]) if line.startswith("dlops ")]


def code_blocks() -> list[tuple[str, str]]:
    return re.findall(r"^```(\w+)\n(.*?)^```", DOCS.read_text(), re.MULTILINE | re.DOTALL)


def joined_lines(script: str) -> list[str]:
    return [line.strip() for line in script.replace("\\\n", " ").splitlines()]


def run_as_nodes(commands: list[list[str]], environments: list[dict[str, str]], *, data: Path, out: Path,
                 tmp_path: Path, experiment: str) -> None:  # fmt: skip
    """Each node runs the documented `dlops` commands in its scheduler's environment, the dataset and the
    shared folder swapped for the test's, and a short CPU training asked last (the last option wins)."""
    short = [*FAST, "-p", "0", "--epochs", "1", "--nproc-per-node", "1", "--experiment", experiment]
    for command in commands:
        assert command[0] == "dlops", command
        args = [os.path.expandvars(a).replace("/shared/data/tiny-imagenet-200", str(data))
                .replace("/shared/runs", str(out)) for a in command[1:]]  # fmt: skip
        nodes = [Node(f"node-{i}", [*args, *short], log=tmp_path / f"node-{i}.log", env=env)
                 for i, env in enumerate(environments)]  # fmt: skip
        for node in nodes:
            node.finish(300)


def test_the_documented_slurm_script_runs_on_two_nodes(tiny_dataset, tmp_path, client, monkeypatch):
    count, commands = slurm_script()
    assert count == 2 and commands and commands[0][:3] == ["dlops", "train", "resnet"]
    port = str(free_port())
    slurm = {"SLURM_JOB_ID": "4242", "SLURM_NNODES": str(count), "SLURM_JOB_NODELIST": "127.0.0.[1-2]",
             "MASTER_PORT": port}  # fmt: skip
    monkeypatch.setenv("SKYPILOT_NUM_GPUS_PER_NODE", "1")  # neither scheduler's variables leak into the other
    run_as_nodes(commands, [{**slurm, "SLURM_NODEID": str(i), "SLURM_PROCID": str(i)} for i in range(count)],
                 data=tiny_dataset, out=tmp_path / "runs", tmp_path=tmp_path, experiment="test-slurm")  # fmt: skip
    run = the_run(client, "test-slurm")
    assert run.info.status == "FINISHED" and run.data.params["nodes"] == "2"
    assert run.data.params["rendezvous"] == f"c10d 127.0.0.1:{port} id slurm-4242 (Slurm)"
    assert metric_steps(client, run.info.run_id, "val/acc1") == [1]


def test_the_documented_skypilot_task_runs_on_two_nodes(tiny_dataset, tmp_path, client):
    count, commands = skypilot_task()
    assert count == 2 and commands and "$SKYPILOT_NUM_GPUS_PER_NODE" in commands[0]
    port = str(free_port())
    sky = {"SKYPILOT_NUM_NODES": str(count), "SKYPILOT_NODE_IPS": "127.0.0.1\n127.0.0.2", "SKYPILOT_TASK_ID": "t-7",
           "SKYPILOT_NUM_GPUS_PER_NODE": "1", "MASTER_PORT": port}  # fmt: skip
    run_as_nodes(commands, [{**sky, "SKYPILOT_NODE_RANK": str(i)} for i in range(count)], data=tiny_dataset,
                 out=tmp_path / "runs", tmp_path=tmp_path, experiment="test-skypilot")  # fmt: skip
    run = the_run(client, "test-skypilot")
    assert run.info.status == "FINISHED" and run.data.params["nodes"] == "2"
    assert run.data.params["rendezvous"] == f"c10d 127.0.0.1:{port} id skypilot-t-7 (SkyPilot)"


def test_a_node_without_the_data_says_so_before_the_rendezvous(tmp_path):
    missing = tmp_path / "not-here"
    started = time.monotonic()
    output = cli_error("train", "resnet", missing, "--nnodes", "2", "--rdzv-endpoint", f"127.0.0.1:{free_port()}")
    assert f"has no DATA folder {missing}: every node needs the data at the same path" in output
    assert time.monotonic() - started < 30, "at once, not after the others' rendezvous timeout"
    output = cli_error("train", "resnet", missing, "--nnodes", "3:2")
    assert "--nnodes" in output and "'3:2' is not a node count" in output
    assert "give --rdzv-endpoint HOST:PORT" in cli_error("train", "resnet", missing, "--nnodes", "2")


@pytest.mark.parametrize(("nodelist", "first"), [("node[03-04,07],gpu9", "node03"), ("gpu-a,gpu-b", "gpu-a"),
                                                 ("single", "single"), ("10.0.0.[5,9]", "10.0.0.5")])  # fmt: skip
def test_the_first_host_of_a_slurm_node_list(nodelist, first):
    assert first_slurm_host(nodelist) == first


def test_options_win_over_the_schedulers_environment():
    slurm = {"SLURM_JOB_ID": "9", "SLURM_NNODES": "4", "SLURM_JOB_NODELIST": "n[1-4]"}
    nodes = resolve_nodes(ResNetConfig(), "resnet", slurm)
    assert (nodes.nnodes, nodes.endpoint, nodes.run_id, nodes.source) == ("4", "n1:29500", "slurm-9", "Slurm")
    given = ResNetConfig(nnodes="2:4", rdzv_endpoint="head", rdzv_id="mine", max_restarts=1)
    nodes = resolve_nodes(given, "resnet", {**slurm, "MASTER_PORT": "6000"})
    assert (nodes.nnodes, nodes.endpoint, nodes.run_id, nodes.source) == ("2:4", "head:6000", "mine", "the options")
    assert "--max-restarts=1" in nodes.torchrun_options() and "--nnodes=2:4" in nodes.torchrun_options()
    assert resolve_nodes(ResNetConfig(), "resnet", {"SLURM_JOB_ID": "9", "SLURM_NNODES": "1"}) is None
