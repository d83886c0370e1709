"""Time the same short ResNet training on several device configurations, one MLflow run each.

Configurations: `cpu` (one process), `cpu:N` (N gloo processes), `cuda:N` (N GPUs, one process
each, nccl; `cuda` = `cuda:1`), `mps`. Each runs as its own `dlops train resnet` process (through
torchrun when N > 1), tagged with a shared comparison id; the table is read back from MLflow.
Configurations this machine cannot run are listed as skipped, with the reason.
"""

from __future__ import annotations

import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch

from serving.secrets import child_environment
from training import tracking
from training.jobs.resnet.metrics import ACC1, DATA_WAIT_SHARE, IMAGES_PER_SECOND
from training.metrics import TOTAL_SECONDS
from training.tracking.tags import BENCH_CONFIG, COMPARISON_ID


@dataclass(kw_only=True, frozen=True)
class DeviceConfig:
    name: str
    device: str
    processes: int


@dataclass(kw_only=True)
class BenchRow:
    config: DeviceConfig
    workers: int
    skipped: str | None = None
    run_id: str | None = None
    epochs: int = 0
    seconds: float = 0.0
    images_per_second: float = 0.0
    data_wait_share: float = 0.0
    val_acc1: float = 0.0


def parse_configs(spec: str) -> list[DeviceConfig]:
    configs = []
    for name in (part.strip() for part in spec.split(",") if part.strip()):
        kind, _, count = name.partition(":")
        if kind not in ("cpu", "cuda", "mps") or (count and not count.isdigit()) or count == "0":
            raise ValueError(f"--configs: {name!r} is not one of cpu, cpu:N, cuda, cuda:N, mps")
        configs.append(DeviceConfig(name=name, device=kind, processes=int(count or 1)))
    return configs


def unavailable(config: DeviceConfig) -> str | None:
    """Why this machine cannot run `config`, or None."""
    if config.device == "cuda":
        count = torch.cuda.device_count() if torch.version.cuda else 0
        if torch.version.cuda is None:
            return f"this torch build ({torch.__version__}) has no CUDA support"
        if count == 0:
            return f"no CUDA device is visible (torch built with CUDA {torch.version.cuda})"
        if count < config.processes:
            return f"needs {config.processes} GPUs, {count} visible"
    if config.device == "mps" and not torch.backends.mps.is_available():
        return "Apple MPS is not available"
    if config.device == "mps" and config.processes > 1:
        return "MPS runs one process"
    return None


def run_config(
    data: Path,
    config: DeviceConfig,
    workers: int,
    *,
    epochs: int,
    experiment: str,
    comparison: str,
    train_args: list[str],
) -> BenchRow:
    row = BenchRow(config=config, workers=workers)
    command = [
        sys.executable, "-m", "training.cli", "train", "resnet", str(data), "--epochs", str(epochs),
        "--device", config.device, "--nproc-per-node", str(config.processes), "-j", str(workers),
        "--experiment", experiment, "--run-name", f"{config.name}-j{workers}", "--registered-model", "device-bench",
        "--tag", f"{COMPARISON_ID}={comparison}", "--tag", f"{BENCH_CONFIG}={config.name}", *train_args,
    ]  # fmt: skip
    print(f"=> {config.name} with {workers} loader workers: {' '.join(command[2:])}", flush=True)
    result = subprocess.run(command, env=child_environment("training", extra={"PYTHONUNBUFFERED": "1"}))
    if result.returncode != 0:
        row.skipped = f"training failed (exit {result.returncode})"
        return row
    client = tracking.store_client()
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    query = f"tags.{COMPARISON_ID} = '{comparison}' and tags.{BENCH_CONFIG} = '{config.name}'"
    runs = [r for r in client.search_runs([experiment_id], query) if r.data.params.get("workers") == str(workers)]
    run = runs[0]
    metrics = (IMAGES_PER_SECOND, DATA_WAIT_SHARE, ACC1.name)
    history = {m: client.get_metric_history(run.info.run_id, m) for m in metrics}
    row.run_id = run.info.run_id
    row.epochs = len(history[ACC1.name])
    row.seconds = run.data.metrics[TOTAL_SECONDS]
    row.images_per_second = sum(m.value for m in history[IMAGES_PER_SECOND]) / row.epochs
    row.data_wait_share = sum(m.value for m in history[DATA_WAIT_SHARE]) / row.epochs
    row.val_acc1 = max(history[ACC1.name], key=lambda m: m.step).value
    return row


def format_table(rows: list[BenchRow]) -> str:
    lines = [f"{'configuration':<14} {'processes':>9} {'workers':>7} {'epochs':>6} {'seconds':>8} {'images/s':>9} "
             f"{'data wait':>9} {'val Acc@1':>9}"]  # fmt: skip
    for r in rows:
        head = f"{r.config.name:<14} {r.config.processes:>9} {'-' if r.skipped else r.workers:>7}"
        if r.skipped:
            lines.append(f"{head} skipped: {r.skipped}")
        else:
            lines.append(f"{head} {r.epochs:>6} {r.seconds:>8.1f} {r.images_per_second:>9.1f} "
                         f"{100 * r.data_wait_share:>8.1f}% {r.val_acc1:>9.2f}")  # fmt: skip
    return "\n".join(lines)


def bench_devices(
    data: Path,
    configs: str,
    *,
    epochs: int = 1,
    workers: str = "2",
    experiment: str = "device-bench",
    train_args: list[str] | None = None,
) -> list[BenchRow]:
    """Run every configuration (x every loader-worker count) and print the comparison table."""
    parsed = parse_configs(configs)
    worker_counts = [int(w) for w in workers.split(",")]
    comparison = uuid.uuid4().hex[:12]
    tracking.ensure_experiment(experiment)
    print(f"=> comparison id {comparison} (MLflow experiment {experiment!r}, tag comparison_id)", flush=True)
    rows = []
    for config in parsed:
        reason = unavailable(config)
        if reason:
            print(f"=> {config.name}: skipped ({reason})", flush=True)
            rows.append(BenchRow(config=config, workers=0, skipped=reason))
            continue
        rows += [
            run_config(
                data,
                config,
                w,
                epochs=epochs,
                experiment=experiment,
                comparison=comparison,
                train_args=list(train_args or []),
            )
            for w in worker_counts
        ]
    print(format_table(rows))
    return rows
