"""What preemption safety costs: epoch time with and without `--checkpoint-every`, and the seconds
from SIGTERM to the process's exit (checkpoint written, run ended KILLED).

Run by hand (not a test):

    .venv/bin/python bench/preemption_cost.py [--data DIR] [--every 10] [--epochs 2] [--stops 3]

Trains the same resnet18 run (fp32, batch 64, the JPEG loader with 2 workers) for --epochs epochs
without and with `--checkpoint-every EVERY`, reporting each epoch's time and the checkpoints
written; then --stops times starts it, sends SIGTERM in the second epoch and times the exit.
Without --data it uses ../shared/data/tiny-imagenet-200-mini when present, else generated data.
Tracking goes to a temporary SQLite store. Only this machine is involved.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from serving import environment

REPO = Path(__file__).resolve().parent.parent
MINI = REPO.parent / "shared" / "data" / "tiny-imagenet-200-mini"


def train_command(data: Path, out: Path, epochs: int, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "training.cli", "train", "resnet", str(data), "--epochs", str(epochs), "-b", "64",
            "-j", "2", "-p", "0", "--out-dir", str(out), "--experiment", "preemption-cost", *extra]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=None)
    parser.add_argument("--every", type=float, default=10.0, help="--checkpoint-every SECONDS of the second run")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--stops", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = args.data or (MINI if MINI.is_dir() else None)
        if data is None:
            from training.jobs.resnet.data.synthetic import write_synthetic_tinyimagenet

            data = write_synthetic_tinyimagenet(
                root / "data", num_classes=20, train_per_class=200, val_per_class=20, progress=False
            )
        env = {**os.environ, environment.TRACKING_URI: f"sqlite:///{root / 'mlflow.db'}", "PYTHONUNBUFFERED": "1"}
        rows = {}
        for name, extra in (("no mid-epoch checkpoints", []), (f"--checkpoint-every {args.every:g}",
                                                               ["--checkpoint-every", str(args.every)])):  # fmt: skip
            out = subprocess.run(train_command(data, root / "runs", args.epochs, extra), cwd=REPO, env=env,
                                 capture_output=True, text=True, check=True).stdout  # fmt: skip
            epochs = [float(s) for s in re.findall(r"\| ([\d.]+) s, [\d,]+ img/s", out)]
            rows[name] = {"epoch_s": epochs, "mid_epoch_checkpoints": out.count("(resumable)")}
            print(name, rows[name], flush=True)
        exits = []
        for _ in range(args.stops):
            process = subprocess.Popen(train_command(data, root / "stops", 3, []), cwd=REPO, env=env,
                                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
            for line in process.stdout:
                if line.startswith("=> epoch saved"):  # epoch 1 done: stop within epoch 2
                    break
            time.sleep(2)
            sent = time.monotonic()
            process.send_signal(signal.SIGTERM)
            process.communicate(timeout=300)
            exits.append(round(time.monotonic() - sent, 1))
            assert process.returncode == 143, process.returncode
        print(f"SIGTERM to exit: {exits} s")
    plain, every = rows.values()
    print("| run | epoch seconds | mid-epoch checkpoints |\n|---|---|---|")
    for name, row in rows.items():
        print(f"| {name} | {', '.join(f'{s:.1f}' for s in row['epoch_s'])} | {row['mid_epoch_checkpoints']} |")
    cost = statistics.mean(every["epoch_s"]) / statistics.mean(plain["epoch_s"]) - 1
    print(f"checkpoint-every cost: {100 * cost:+.1f}% epoch time; SIGTERM to exit: median "
          f"{statistics.median(exits):.1f} s over {len(exits)} stops")  # fmt: skip
    print(json.dumps({"runs": rows, "sigterm_to_exit_s": exits}))


if __name__ == "__main__":
    main()
