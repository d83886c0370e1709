"""Pictures for the README: the MLflow experiment list and the run-compare view (`make screenshots`).

Trains two short ResNet runs on the generated dataset into a temporary tracking store, starts the
MLflow UI on 127.0.0.1, and has headless Chromium save PNGs of both pages into docs/.
Needs Debian's chromium package (apt-get install -y chromium); not part of `make test`.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "data" / "synthetic"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars", "--window-size=1600,1000", "--virtual-time-budget=20000"]  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def screenshot(chromium: str, url: str, out: Path, profile: Path) -> None:
    subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--screenshot={out}", url],
                   check=True, capture_output=True, timeout=120)  # fmt: skip
    print(f"=> {out} ({out.stat().st_size // 1024} KB)")


def main() -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium:
        sys.exit("headless Chromium is needed: apt-get install -y chromium")
    if not (DATA / "wnids.txt").is_file():
        sys.exit(f"{DATA} is missing: run `make demo` (or `dlops data synth {DATA}`) first")
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
        dlops = [sys.executable, "-m", "training.cli"]
        for name, lr in (("lr-0.02", "0.02"), ("lr-0.05", "0.05")):
            subprocess.run([*dlops, "train", "resnet", str(DATA), "--epochs", "4", "-b", "32", "--lr", lr, "-p", "0",
                            "--scheduler", "cosine", "--run-name", name, "--out-dir", str(tmp_path / "runs")],
                           check=True, env=env, cwd=REPO)  # fmt: skip
        port = free_port()
        ui = subprocess.Popen([str(Path(sys.executable).with_name("mlflow")), "ui", "--host", "127.0.0.1", "--port",
                               str(port), "--backend-store-uri", env["MLFLOW_TRACKING_URI"]],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        try:
            base = f"http://127.0.0.1:{port}"
            for _ in range(120):
                try:
                    urllib.request.urlopen(f"{base}/health", timeout=2)
                    break
                except OSError:
                    time.sleep(1)
            from mlflow.tracking import MlflowClient

            client = MlflowClient(env["MLFLOW_TRACKING_URI"])
            experiment = client.get_experiment_by_name("resnet-tinyimagenet").experiment_id
            runs = [r.info.run_id for r in client.search_runs([experiment], "tags.job = 'train-resnet'")]
            compare = urllib.parse.quote(json.dumps(runs))
            docs = REPO / "docs"
            docs.mkdir(exist_ok=True)
            screenshot(
                chromium, f"{base}/#/experiments/{experiment}/runs", docs / "mlflow-experiment.png", tmp_path / "p1"
            )
            screenshot(chromium, f"{base}/#/compare-runs?runs={compare}&experiments=%5B%22{experiment}%22%5D",
                       docs / "mlflow-compare.png", tmp_path / "p2")  # fmt: skip
            curves = next((tmp_path / "runs").glob("*/learning_curves.png"))
            shutil.copy(curves, docs / "learning-curves.png")
            print(f"=> {docs / 'learning-curves.png'}")
        finally:
            ui.terminate()
            ui.wait(timeout=30)


if __name__ == "__main__":
    main()
