"""Pictures for the README, taken from a real MLflow UI and a real report with headless Chromium.

    .venv/bin/python scripts/screenshots.py                  # docs/mlflow-experiment.png, mlflow-compare.png,
                                                              # learning-curves.png, report.png
    .venv/bin/python scripts/screenshots.py --sweep STUDY     # docs/mlflow-sweep-compare.png, from the
                                                              # configured tracking store (MLFLOW_TRACKING_URI)

The first trains three short runs that differ in `lr` into a temporary store. The MLflow UI is
driven with Playwright (the `playwright` package, with Debian's Chromium: `apt-get install -y
chromium`; no browser download): its "Model training" view, the Assistant panel closed, the
columns a person compares runs by. Not part of `make test`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from contextlib import contextmanager
from pathlib import Path

from serving import environment
from training.jobs.resnet.metrics import ACC1
from training.metrics import VAL_LOSS, best_metric_name
from training.tracking.artifacts import LEARNING_CURVES

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "data" / "synthetic"
DOCS = REPO / "docs"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def as_json(value) -> str:
    return urllib.parse.quote(json.dumps(value, separators=(",", ":")), safe="")


@contextmanager
def mlflow_ui(store_uri: str):
    port = free_port()
    ui = subprocess.Popen([str(Path(sys.executable).with_name("mlflow")), "ui", "--host", "127.0.0.1", "--port",
                           str(port), "--backend-store-uri", store_uri],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                          env={**os.environ, environment.JOB_EXECUTION: "false"})  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(f"{base}/health", timeout=2)
                break
            except OSError:
                time.sleep(1)
        yield base
    finally:
        ui.terminate()
        ui.wait(timeout=30)


@contextmanager
def browser():
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium:
        sys.exit("headless Chromium is needed: apt-get install -y chromium")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu", "--disable-quic",
                                                              "--disable-background-networking"])  # fmt: skip
        page = b.new_page(viewport={"width": 1500, "height": 900})
        try:
            yield page
        finally:
            b.close()


def model_training_mode(page, base: str) -> None:
    """The UI's "Model training" mode, the Assistant panel closed (both remembered by the browser)."""
    page.goto(f"{base}/#/experiments")
    page.wait_for_timeout(4000)
    page.get_by_text("Model training", exact=True).click()
    page.wait_for_timeout(800)
    close = page.get_by_role("button", name="Close")
    if close.count():
        close.first.click()
        page.wait_for_timeout(500)


def pick_columns(page, metrics: list[str], params: list[str], hide: list[str]) -> None:
    """Toggle columns in the runs table's Columns menu: show `metrics` and `params` (a param after the
    metric of the same name), hide the attribute columns in `hide`."""
    page.get_by_role("button", name="Columns").click()
    page.wait_for_timeout(800)
    search = page.get_by_placeholder("Search columns")
    for name, which in [(h, "first") for h in hide] + [(m, "first") for m in metrics] + [(p, "last") for p in params]:
        search.fill(name)
        page.wait_for_timeout(600)
        title = page.locator(".du-bois-light-tree-title", has_text=re.compile(f"^{re.escape(name)}$"))
        node = page.locator(".du-bois-light-tree-treenode", has=title)
        getattr(node, which).locator(".du-bois-light-tree-checkbox").click()
        page.wait_for_timeout(400)
    page.keyboard.press("Escape")
    page.wait_for_timeout(800)


def experiment_view(page, base: str, experiment_id: str, out: Path) -> None:
    page.goto(f"{base}/#/experiments/{experiment_id}/runs")
    page.wait_for_timeout(4000)
    pick_columns(page, [ACC1.name, best_metric_name(ACC1.name)], ["lr"], hide=["Dataset", "Source", "Models"])
    page.screenshot(path=str(out), clip={"x": 0, "y": 0, "width": 1500, "height": 480})
    print(f"=> {out}")


def metrics_overlay(page, base: str, runs: list[str], *, experiment_id: str, keys: list[str], out: Path) -> None:
    """MLflow's run comparison by metric: `keys` overlaid for every run, by step (epoch)."""
    query = (f"runs={as_json(runs)}&metric={as_json(keys[0])}&experiments={as_json([experiment_id])}"
             f"&plot_metric_keys={as_json(keys)}&plot_layout=%7B%7D&x_axis=step&y_axis_scale=linear"
             "&line_smoothness=1&show_point=true&deselected_curves=%5B%5D"
             "&last_linear_y_axis_range=%5B%5D")  # fmt: skip
    page.goto(f"{base}/#/metric/{urllib.parse.quote(keys[0], safe='')}?{query}")
    page.wait_for_timeout(5000)
    page.screenshot(path=str(out), clip={"x": 0, "y": 0, "width": 1500, "height": 560})
    print(f"=> {out}")


def parallel_coordinates(page, base: str, runs: list[str], *, experiment_id: str, params: list[str], metric: str,
                         out: Path) -> None:  # fmt: skip
    """The compare view's parallel-coordinates plot of the searched params against the metric."""
    page.goto(f"{base}/#/compare-runs?runs={as_json(runs)}&experiments={as_json([experiment_id])}")
    page.wait_for_timeout(5000)
    page.get_by_role("button", name="Clear All").click()
    page.wait_for_timeout(500)
    selects = page.locator(".ant-select-selector, [role=combobox]")
    for index, names in ((0, params), (1, [metric])):
        for name in names:
            selects.nth(index).click()
            page.keyboard.type(name)
            page.wait_for_timeout(400)
            page.keyboard.press("Enter")
            page.wait_for_timeout(400)
        page.keyboard.press("Escape")
    page.wait_for_timeout(1500)
    page.screenshot(path=str(out), clip={"x": 0, "y": 0, "width": 1500, "height": 620})
    print(f"=> {out}")


def report_picture(html: Path, out: Path) -> None:
    with browser() as page:
        page.set_viewport_size({"width": 1300, "height": 1400})
        page.goto(html.as_uri())
        page.wait_for_timeout(1500)
        page.screenshot(path=str(out), clip={"x": 0, "y": 0, "width": 1300, "height": 1400})
    print(f"=> {out}")


def dlops(*args: str, env: dict) -> None:
    subprocess.run([sys.executable, "-m", "training.cli", *args], check=True, env=env, cwd=REPO)


def readme_pictures() -> None:
    if not (DATA / "wnids.txt").is_file():
        sys.exit(f"{DATA} is missing: run `make demo` (or `dlops data synth {DATA}`) first")
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        store = f"sqlite:///{tmp_path / 'mlflow.db'}"
        env = {**os.environ, environment.TRACKING_URI: store}
        for lr in ("0.005", "0.01", "0.02"):
            dlops("train", "resnet", str(DATA), "--epochs", "5", "-b", "32", "--lr", lr, "-p", "0", "--scheduler",
                  "cosine", "--run-name", f"lr-{lr}", "--out-dir", str(tmp_path / "runs"), env=env)  # fmt: skip
        from mlflow.tracking import MlflowClient

        client = MlflowClient(store)
        experiment = client.get_experiment_by_name("resnet-tinyimagenet").experiment_id
        runs = [r.info.run_id for r in client.search_runs([experiment], "tags.job = 'train-resnet'")]
        dlops("report", "--experiment", "resnet-tinyimagenet", "--out", str(tmp_path / "report"), "--title",
              "Three learning rates", env=env)  # fmt: skip
        DOCS.mkdir(exist_ok=True)
        with mlflow_ui(store) as base, browser() as page:
            model_training_mode(page, base)
            experiment_view(page, base, experiment, DOCS / "mlflow-experiment.png")
            metrics_overlay(
                page,
                base,
                runs,
                experiment_id=experiment,
                keys=[ACC1.name, VAL_LOSS.name],
                out=DOCS / "mlflow-compare.png",
            )
        report_picture(tmp_path / "report" / "report.html", DOCS / "report.png")
        shutil.copy(next((tmp_path / "runs").glob(f"*/{LEARNING_CURVES}")), DOCS / "learning-curves.png")
        print(f"=> {DOCS / 'learning-curves.png'}")


def sweep_picture(study: str) -> None:
    """The compare view of a sweep's trials, from the configured tracking store."""
    from mlflow.tracking import MlflowClient

    from training.tracking import tracking_uri

    client = MlflowClient(tracking_uri())
    runs = [r for e in client.search_experiments()
            for r in client.search_runs([e.experiment_id], f"tags.sweep_id = '{study}'")]  # fmt: skip
    parent = next(r for r in runs if r.data.tags.get("sweep_role") == "parent")
    trials = [r.info.run_id for r in runs if "trial" in r.data.tags]
    space = list(json.loads(parent.data.params["space"]))
    with mlflow_ui(tracking_uri()) as base, browser() as page:
        model_training_mode(page, base)
        parallel_coordinates(
            page,
            base,
            trials,
            experiment_id=parent.info.experiment_id,
            params=space,
            metric=parent.data.params["metric"],
            out=DOCS / "mlflow-sweep-compare.png",
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sweep", default=None, help="picture the compare view of this sweep's trials instead")
    args = parser.parse_args()
    if args.sweep:
        sweep_picture(args.sweep)
    else:
        readme_pictures()


if __name__ == "__main__":
    main()
