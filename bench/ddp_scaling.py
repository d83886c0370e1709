"""Several processes on one machine against the same processes as separate nodes: images/s, and the
time torchrun's c10d rendezvous takes.

Run by hand (not a test):

    .venv/bin/python bench/ddp_scaling.py [--data DIR] [--epochs 2] [--batch 64] [--json OUT]

Trains the same ResNet run (resnet18, the decoded cache, `--amp auto`) three ways on this machine:
1 node x 1 process (the baseline), 1 node x 2 processes (`--nproc-per-node 2`, torchrun --standalone)
and 2 nodes x 1 process (two `dlops train --nnodes 2` launchers meeting at a c10d rendezvous on
127.0.0.1, each with its own decoded cache, standing for two machines of one core each: each node is
pinned to a core of its own and runs one thread, as torchrun gives each of its processes in the
1 x 2 configuration; unpinned, two 2-thread processes on 2 cores ran 7x slower than 1 x 2). Images/s is the last epoch's
`time/images_per_second` (the first includes warm-up), read back from MLflow; the rendezvous time
is read from torchrun's own log lines (LOGLEVEL=INFO): from the later node's "Rendezvous'ing worker
group" to its "Rendezvous complete". Without --data it uses ../shared/data/tiny-imagenet-200-mini when
present, else generated data. Tracking goes to a temporary SQLite store.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mlflow import MlflowClient

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from serving import environment  # noqa: E402
from training.jobs.resnet.metrics import IMAGES_PER_SECOND  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
MINI = REPO.parent / "shared" / "data" / "tiny-imagenet-200-mini"
EXPERIMENT = "ddp-scaling"
# torchrun's log lines (LOGLEVEL=INFO): I1207 00:04:05.142000 PID path:line] [default] Rendezvous'ing worker group
LOG_TIME = r"^I\d{4} (\d\d:\d\d:\d\d\.\d+) .*"
JOINING = re.compile(LOG_TIME + r"Rendezvous'ing worker group", re.MULTILINE)
JOINED = re.compile(LOG_TIME + r"Rendezvous complete for workers", re.MULTILINE)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_args(data: Path, out: Path, config: str, args: argparse.Namespace) -> list[str]:
    return [sys.executable, "-m", "training.cli", "train", "resnet", str(data), "--epochs", str(args.epochs),
            "-b", str(args.batch), "-j", "0", "-p", "0", "--lr", "0.02", "--out-dir", str(out),
            "--experiment", EXPERIMENT, "--run-name", config]  # fmt: skip


def start(command: list[str], env: dict[str, str], log: Path, core: int | None = None) -> subprocess.Popen:
    """`command` with its output in `log`; pinned to CPU `core` (a machine of one core) when given."""
    pin = (lambda: os.sched_setaffinity(0, {core})) if core is not None else None
    with log.open("w") as out:
        return subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, preexec_fn=pin)


def finish(process: subprocess.Popen, log: Path) -> None:
    if process.wait() != 0:
        raise SystemExit(f"{log} exited {process.returncode}:\n{log.read_text()[-3000:]}")


def clock(stamp: str) -> float:
    return datetime.datetime.strptime(stamp, "%H:%M:%S.%f").timestamp()


def rendezvous_seconds(logs: list[Path]) -> float:
    """From the later node's arrival at the rendezvous to its completion (the first round)."""
    arrivals = [(clock(JOINING.search(log.read_text()).group(1)), log) for log in logs]
    arrived, later = max(arrivals)
    return clock(JOINED.search(later.read_text()).group(1)) - arrived


def run_config(config: str, data: Path, root: Path, env: dict[str, str], args: argparse.Namespace) -> dict:
    command = train_args(data, root / "runs", config, args)
    started = time.perf_counter()
    if config == "2 nodes x 1":
        endpoint = f"127.0.0.1:{free_port()}"
        nodes = ["--nnodes", "2", "--rdzv-endpoint", endpoint, "--rdzv-id", f"bench-{endpoint}"]
        logs = [root / f"node-{i}.log" for i in range(2)]
        cores = sorted(os.sched_getaffinity(0))
        processes = [start([*command, *nodes], {**env, environment.SYSTEM_METRICS_NODE_ID: f"node-{i}",
                                               environment.CACHE_DIR: str(root / f"cache-{i}"), "OMP_NUM_THREADS": "1"},
                           log, core=cores[i % len(cores)])
                     for i, log in enumerate(logs)]  # fmt: skip
        for process, log in zip(processes, logs, strict=True):
            finish(process, log)
        found = {"rendezvous_s": round(rendezvous_seconds(logs), 2)}
    else:
        log = root / f"{config.replace(' ', '')}.log"
        processes = ["--nproc-per-node", "2"] if config == "1 node x 2" else []
        finish(start([*command, *processes], {**env, environment.CACHE_DIR: str(root / "cache-0")}, log), log)
        found = {}
    client = MlflowClient(env[environment.TRACKING_URI])
    run = client.search_runs([client.get_experiment_by_name(EXPERIMENT).experiment_id],
                             f"tags.mlflow.runName = '{config}'")[0]  # fmt: skip
    speeds = sorted(client.get_metric_history(run.info.run_id, IMAGES_PER_SECOND), key=lambda m: m.step)
    return {"config": config, "images_per_s": round(speeds[-1].value, 1), "wall_s": round(time.perf_counter() -
            started, 1), **found}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=None)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64, help="the global batch (every configuration)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = args.data or (MINI if MINI.is_dir() else None)
        if data is None:
            from training.jobs.resnet.data.synthetic import write_synthetic_tinyimagenet

            data = write_synthetic_tinyimagenet(root / "data", num_classes=20, train_per_class=50, val_per_class=10,
                                                progress=False)  # fmt: skip
        env = {**os.environ, environment.TRACKING_URI: f"sqlite:///{root / 'mlflow.db'}", "PYTHONUNBUFFERED": "1",
               "LOGLEVEL": "INFO"}  # fmt: skip
        rows = []
        for config in ("1 node x 1", "1 node x 2", "2 nodes x 1"):
            rows.append(run_config(config, data, root, env, args))
            print(json.dumps(rows[-1]), flush=True)
    print(f"\ndata {data}, {args.epochs} epochs, global batch {args.batch}")
    print("| configuration | images/s (last epoch) | vs 1 x 1 | wall s | rendezvous s |\n|---|---|---|---|---|")
    for row in rows:
        ratio = row["images_per_s"] / rows[0]["images_per_s"]
        print(f"| {row['config']} | {row['images_per_s']} | {ratio:.2f}x | {row['wall_s']} | "
              f"{row.get('rendezvous_s', '-')} |")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
