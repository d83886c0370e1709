"""Time to accuracy on a full dataset: a real training command, timed from its first step of data
preparation to each validation figure, recorded as an MLflow run with its learning curve.

    .venv/bin/python bench/time_to_accuracy.py resnet /data/tiny-imagenet-200 -- --recipe fast --epochs 14
    .venv/bin/python bench/time_to_accuracy.py lm ../shared/data/wikitext-2 -- --model LSTM --tied --epochs 4

What it times is what a user waits for: for the ResNet, `dlops data cache` (the decoded cache, built
fresh in --cache-dir unless --keep-cache) and then `dlops train resnet DATA ARGS`; for the LM, `dlops
train lm DATA ARGS`. The training run's own metrics give each epoch's validation figure and the time
it was logged, so "minutes to X% top-1" is wall time from the start of data preparation to the
first epoch at or above X. The summary is a run of experiment `time-to-accuracy` (params: the
command and the machine; metrics: minutes to each threshold, the final figures, cache build seconds
and size) with `time_to_accuracy.png` (the figure against wall minutes), and a Markdown table row
printed at the end. Run it alone on the machine: anything else running shares its cores.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from matplotlib.figure import Figure
from mlflow.tracking import MlflowClient

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from serving import environment  # noqa: E402
from training import tracking  # noqa: E402
from training.jobs.lm import PPL, TEST_PPL  # noqa: E402
from training.jobs.resnet.metrics import ACC1, ACC5  # noqa: E402
from training.tracking.tags import JOB_TAG, SOURCE_RUN_TAG, training_job  # noqa: E402

THRESHOLDS = (20.0, 28.0, 35.0, 40.0, 50.0)  # val top-1 (%), the ResNet table's columns
QUALITY = {"resnet": (ACC1.name, "val top-1 (%)"), "lm": (PPL.name, "val perplexity")}


def machine() -> dict[str, str]:
    flags = Path("/proc/cpuinfo").read_text().split("flags")[1].split("\n")[0] if Path("/proc/cpuinfo").exists() else ""
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())  # fmt: skip
    kind = "avx512_bf16" if "avx512_bf16" in flags.split() else "avx2" if "avx2" in flags.split() else "other"
    if os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper() == "AVX2":
        kind = "avx2 (restricted)"
    return {"cpu": model, "cores": str(os.cpu_count()), "cpu_kind": kind, "amx": str("amx_bf16" in flags.split())}


def dlops(*args: str, env: dict[str, str]) -> float:
    """Run a dlops command, its output streamed; return its wall seconds."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "training.cli", *args], env=env, cwd=REPO, check=True)
    return time.perf_counter() - start


def training_run(client: MlflowClient, experiment: str, run_name: str, kind: str):
    found = client.get_experiment_by_name(experiment)
    runs = client.search_runs([found.experiment_id], f"tags.mlflow.runName = '{run_name}' and tags.{JOB_TAG} = "
                              f"'{training_job(kind)}'", max_results=1)  # fmt: skip
    if not runs:
        raise SystemExit(f"no training run {run_name!r} in {experiment}")
    return runs[0]


def curve_picture(points: list[tuple[float, float]], label: str, title: str, path: Path) -> Path:
    figure = Figure(figsize=(7, 4))
    ax = figure.subplots()
    ax.plot([m for m, _ in points], [v for _, v in points], marker="o")
    ax.set_xlabel("wall minutes from the start of data preparation")
    ax.set_ylabel(label)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kind", choices=sorted(QUALITY))
    parser.add_argument("data", type=Path)
    parser.add_argument("--cache-dir", type=Path, default=None, help="the decoded cache [default: a fresh folder]")
    parser.add_argument("--keep-cache", action="store_true", help="use --cache-dir as it is (time no build)")
    parser.add_argument("--name", default=None, help="the training run's name [default: tta-KIND-<time>]")
    argv = sys.argv[1:]
    split = argv.index("--") if "--" in argv else len(argv)
    args, train_args = parser.parse_args(argv[:split]), argv[split + 1 :]  # after --: options of `dlops train KIND`
    name = args.name or f"tta-{args.kind}-{time.strftime('%Y%m%d-%H%M%S')}"
    experiment = f"time-to-accuracy-{args.kind}-runs"
    with tempfile.TemporaryDirectory() as tmp:
        cache = args.cache_dir or Path(tmp) / "cache"
        env = {**os.environ, environment.CACHE_DIR: str(cache), "PYTHONUNBUFFERED": "1"}
        started = time.time()
        cache_seconds, cache_bytes = 0.0, 0
        if args.kind == "resnet":
            if not args.keep_cache:
                shutil.rmtree(cache, ignore_errors=True)
                cache_seconds = dlops("data", "cache", str(args.data), env=env)
            cache_bytes = sum(f.stat().st_size for f in cache.rglob("*") if f.is_file())
        train_seconds = dlops("train", args.kind, str(args.data), *train_args, "--run-name", name, "--experiment",
                              experiment, env=env)  # fmt: skip
    client = tracking.store_client()
    run = training_run(client, experiment, name, args.kind)
    metric, label = QUALITY[args.kind]
    history = sorted(client.get_metric_history(run.info.run_id, metric), key=lambda m: m.step)
    points = [((m.timestamp / 1000 - started) / 60, m.value) for m in history]
    total_minutes = (cache_seconds + train_seconds) / 60
    results: dict[str, float] = {"total_minutes": total_minutes, "cache_seconds": cache_seconds,
                                 "cache_gb": cache_bytes / 1e9, "epochs": len(points)}  # fmt: skip
    if args.kind == "resnet":
        for threshold in THRESHOLDS:
            reached = next((minutes for minutes, value in points if value >= threshold), None)
            if reached is not None:
                results[f"minutes_to_{threshold:g}"] = reached
        results["final_val_acc1"] = points[-1][1]
        results["final_val_acc5"] = run.data.metrics.get(ACC5.name, float("nan"))
    else:
        results["test_ppl"] = run.data.metrics[TEST_PPL]
        results["best_val_ppl"] = min(v for _, v in points)
    facts = machine()
    with tracking.start_run("time-to-accuracy", run_name=f"{name} ({facts['cpu_kind']})",
                            tags={SOURCE_RUN_TAG: run.info.run_id}) as summary:  # fmt: skip
        summary.log_params({"kind": args.kind, "data": str(args.data.resolve()), "train_args": " ".join(train_args),
                            **facts})  # fmt: skip
        summary.log_metrics(results, step=0)
        picture = curve_picture(points, label, f"{args.kind}: {' '.join(train_args)}",
                                Path(tempfile.gettempdir()) / "time_to_accuracy.png")  # fmt: skip
        summary.log_artifact(picture)
    print(f"\nmachine: {facts}\n" + "\n".join(f"  epoch {i + 1}: {m:.1f} min, {label} {v:.2f}"
                                                for i, (m, v) in enumerate(points)))  # fmt: skip
    cells = [f"{results.get(f'minutes_to_{t:g}', float('nan')):.1f}" for t in THRESHOLDS] if args.kind == "resnet" \
        else [f"{results['test_ppl']:.2f}"]  # fmt: skip
    print(f"| {' '.join(train_args)} | {' | '.join(cells)} | {total_minutes:.1f} | cache {cache_seconds:.0f} s, "
          f"{cache_bytes / 1e9:.2f} GB |")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
