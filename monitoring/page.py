"""`dlops monitor`: each served model's figures over a window, per version, as pictures in one HTML page.

The figures are the recording rules of monitoring/rules.yml, read from Prometheus's query API:
requests per second, the share answered with an error, and the handler's p50 and p99 latency; the
page adds the latest drift and feedback checks of the `monitoring` experiment (MLflow).
"""

from __future__ import annotations

import base64
import datetime
import io
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from monitoring import prometheus
from monitoring.runs import CHECK, DRIFT_SHARE, EXPERIMENT, LIVE_PREFIX, LOGGED_REQUESTS, MODEL_VERSION
from training.plots import Picture
from training.tracking.tags import DRIFT_VERDICT

TEMPLATES = Path(__file__).resolve().parent / "templates"
# panel title -> (recording rule, the unit's factor): monitoring/rules.yml
PANELS = {
    "requests per second": ("dlops:requests:rate1m", 1.0),
    "error rate (share of requests)": ("dlops:errors:ratio1m", 1.0),
    "p50 latency (ms, in the handler)": ("dlops:latency_seconds:p50_1m", 1000.0),
    "p99 latency (ms, in the handler)": ("dlops:latency_seconds:p99_1m", 1000.0),
}
TOTAL = "dlops:requests:total"


@dataclass(frozen=True, kw_only=True)
class VersionFigures:
    model: str
    version: str
    requests: float  # counted since the server started
    latest: dict[str, float | None]  # panel -> its last value in the window


def series(url: str, *, start: float, end: float, step_s: float) -> dict[str, dict[tuple[str, str], list]]:
    """panel -> (model, version) -> [(time, value), ...] from Prometheus."""
    found: dict[str, dict[tuple[str, str], list]] = {}
    for title, (rule, factor) in PANELS.items():
        for result in prometheus.query_range(url, rule, start=start, end=end, step_s=step_s):
            key = (result["metric"].get("ModelName", "?"), result["metric"].get("Version", "?"))
            points = [(float(t), float(v) * factor) for t, v in result["values"] if v not in ("NaN", "+Inf", "-Inf")]
            found.setdefault(title, {})[key] = points
    return found


def picture(model: str, panels: dict[str, dict[tuple[str, str], list]]) -> Picture:
    from matplotlib.dates import AutoDateLocator, ConciseDateFormatter
    from matplotlib.figure import Figure

    figure = Figure(figsize=(12, 6.5))
    axes = figure.subplots(2, 2).flatten()
    for ax, title in zip(axes, PANELS, strict=True):
        for (name, version), points in sorted(panels.get(title, {}).items()):
            if name == model and points:
                times = [datetime.datetime.fromtimestamp(t) for t, _ in points]
                ax.plot(times, [v for _, v in points], marker=".", markersize=3, label=f"version {version}")
        ax.set_title(title)
        locator = AutoDateLocator()
        ax.xaxis.set_major_locator(locator)
        ax.xaxis.set_major_formatter(ConciseDateFormatter(locator))
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png", dpi=80)
    return Picture(name=f"monitor-{model}.png", png=buffer.getvalue(), alt=f"{model}: requests, errors, latency")


def recent_checks(limit: int = 20) -> list[dict[str, Any]]:
    """The latest drift and feedback checks (MLflow's `monitoring` experiment), newest first."""
    from training.tracking import store_client

    client = store_client()
    experiment = client.get_experiment_by_name(EXPERIMENT)
    if experiment is None:
        return []
    checks = []
    for run in client.search_runs([experiment.experiment_id], order_by=["attributes.start_time DESC"],
                                  max_results=limit):  # fmt: skip
        metrics = run.data.metrics
        live = next(((k.removeprefix(LIVE_PREFIX), v) for k, v in metrics.items() if k.startswith(LIVE_PREFIX)), None)
        checks.append({"when": datetime.datetime.fromtimestamp(run.info.start_time / 1000).strftime("%Y-%m-%d %H:%M"),
                       "version": run.data.params.get(MODEL_VERSION), "check": run.data.params.get(CHECK),
                       "verdict": run.data.tags.get(DRIFT_VERDICT, ""), "share": metrics.get(DRIFT_SHARE),
                       "requests": metrics.get(LOGGED_REQUESTS), "live": live, "run_id": run.info.run_id})  # fmt: skip
    return checks


def last_value(panels: dict[str, dict[tuple[str, str], list]], title: str, key: tuple[str, str]) -> float | None:
    """A version's latest value of a panel's series in the window (None: no sample)."""
    points = panels.get(title, {}).get(key)
    return points[-1][1] if points else None


def write_page(out: Path, *, url: str, window_s: float, now: float | None = None) -> Path:
    """Query Prometheus for the window ending now and write out/monitor.html."""
    import jinja2

    end = time.time() if now is None else now
    start, step = end - window_s, max(window_s / 240, 1.0)
    panels = series(url, start=start, end=end, step_s=step)
    totals = {(r["metric"].get("ModelName"), r["metric"].get("Version")): float(r["value"][1])
              for r in prometheus.query(url, TOTAL, at=end)}  # fmt: skip
    keys = sorted(set(totals) | {key for found in panels.values() for key in found})
    figures = [VersionFigures(model=m, version=v, requests=totals.get((m, v), 0.0),
                              latest={title: last_value(panels, title, (m, v)) for title in PANELS})
               for m, v in keys]  # fmt: skip
    pictures = [picture(model, panels) for model in sorted({m for m, _ in keys})]
    environment = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES)), autoescape=True,
                                     trim_blocks=True, lstrip_blocks=True)  # fmt: skip
    html = environment.get_template("monitor.html.j2").render(
        figures=figures, pictures=pictures, panels=list(PANELS), checks=recent_checks(), prometheus=url,
        window=f"{window_s / 60:g} min", generated_at=datetime.datetime.fromtimestamp(end).strftime("%Y-%m-%d %H:%M"),
        src=lambda p: "data:image/png;base64," + base64.b64encode(p.png).decode("ascii"),
    )  # fmt: skip
    Path(out).mkdir(parents=True, exist_ok=True)
    path = Path(out) / "monitor.html"
    path.write_text(html, encoding="utf-8")
    return path
