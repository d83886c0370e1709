"""What an outage of the tracking server costs a training run: the same run with and without one.

Run by hand (not a test):

    .venv/bin/python bench/outage_cost.py [--epochs 30] [--data DIR]

Starts a real `mlflow server` (SQLite, on its own core when there are two, niced) and trains the
same short ResNet run twice against it (on the other cores, one thread): once undisturbed, once
with the server SIGKILLed after epoch 1 and started again after three more epochs. Prints both
runs' training time (time/total_seconds, the sum of the epochs), the outage's length and whether
each run ended FINISHED with every epoch's metrics once. Without --data it generates a small
dataset. Only 127.0.0.1 is contacted.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from mlflow.tracking import MlflowClient  # noqa: E402

from serving import environment  # noqa: E402
from tests.test_tracking_outages import Server, latest_run, metric_steps, train_process, wait_for  # noqa: E402
from training.jobs.resnet.data.synthetic import write_synthetic_tinyimagenet  # noqa: E402
from training.jobs.resnet.metrics import ACC1  # noqa: E402
from training.metrics import TOTAL_SECONDS  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--data", type=Path, default=None)
    args = parser.parse_args()
    os.environ.setdefault(environment.JOB_EXECUTION, "false")  # no GenAI job runners beside the server
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = args.data or write_synthetic_tinyimagenet(
            root / "data", num_classes=4, train_per_class=12, val_per_class=4, progress=False
        )
        server = Server(root)
        server.start()
        client = MlflowClient(server.uri)
        common = ["--epochs", str(args.epochs), "--out-dir", str(root / "runs"), "--experiment", "outage-cost"]
        steady = train_process(server.uri, data, *common, "--run-name", "steady", pinned=True)
        assert steady.wait(timeout=1200) == 0, steady.stdout.read()[-3000:]
        disturbed = train_process(server.uri, data, *common, "--run-name", "disturbed", pinned=True)
        seen: list[str] = []
        wait_for(disturbed, "=> epoch saved", seen)
        server.kill()
        down = time.monotonic()
        for _ in range(3):
            wait_for(disturbed, "=> epoch saved", seen)
        server.start()
        outage = time.monotonic() - down
        seen += disturbed.stdout.readlines()
        assert disturbed.wait(timeout=1200) == 0, "".join(seen)[-3000:]
        rows = {}
        for name in ("steady", "disturbed"):
            run = latest_run(client, "outage-cost", **{"mlflow.runName": name})
            steps = metric_steps(client, run.info.run_id, ACC1.name)
            rows[name] = {"training_s": round(run.data.metrics[TOTAL_SECONDS], 1), "status": run.info.status,
                          "every_epoch_once": steps == list(range(1, args.epochs + 1))}  # fmt: skip
        server.kill()
    print(f"outage {outage:.1f} s; {args.epochs} epochs")
    print("| run | training s | status | every epoch once |\n|---|---|---|---|")
    for name, row in rows.items():
        print(f"| {name} | {row['training_s']} | {row['status']} | {row['every_epoch_once']} |")
    print(json.dumps({"outage_s": round(outage, 1), **rows}))


if __name__ == "__main__":
    main()
