"""Assemble a report: select runs, gather each section, draw pictures, render HTML and Markdown.

report.html          one self-contained page: pictures embedded as data URIs, no network needed
report.md            the Markdown twin, its pictures in report_files/ beside it
"""

from __future__ import annotations

import base64
import datetime
from pathlib import Path
from typing import Any

import jinja2

from training import tracking
from training.report import collect
from training.report.pictures import Picture, learning_curves, thumbnail

TEMPLATES = Path(__file__).resolve().parent / "templates"


def _number(value: Any, digits: int = 2) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def gather(client, runs: list[collect.RunFacts], mlflow_url: str | None) -> tuple[dict[str, Any], list[Picture]]:
    sections = {
        "overview": collect.overview_section(client, runs, mlflow_url),
        "curves": collect.curves_section(client, runs),
        "bench": collect.bench_section(client, runs),
        "layers": collect.layers_section(client, runs),
        "evaluation": collect.evaluation_section(client, runs),
        "epochs": collect.epoch_tables_section(client, runs),
        "environment": collect.environment_section(runs),
    }
    pictures: list[Picture] = []
    if sections["curves"]:
        curves = sections["curves"]
        curves["pictures"] = [learning_curves(curves["series"], job.kind, job.report.quality) for job in curves["jobs"]]
        pictures += curves["pictures"]
    for comparison in (sections["evaluation"] or {}).get("comparisons", []):
        for index, row in enumerate(comparison["first"]):
            picture = thumbnail(Path(row["path"]), f"{comparison['name']}-{index}.png")
            row["thumbnail"] = picture
            if picture:
                pictures.append(picture)
    return sections, pictures


def write_report(out: Path, title: str, runs: list[collect.RunFacts], *, sections: dict[str, Any],
                 pictures: list[Picture], selection: str) -> tuple[Path, Path]:  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    files = out / "report_files"
    files.mkdir(exist_ok=True)
    for picture in pictures:
        (files / picture.name).write_bytes(picture.png)
    context = {"title": title, "runs": runs, "sections": sections, "selection": selection, "number": _number,
               "generated": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
               "tracking_uri": tracking.tracking_uri()}  # fmt: skip
    loader = jinja2.FileSystemLoader(TEMPLATES)
    html_env = jinja2.Environment(loader=loader, autoescape=True, trim_blocks=True, lstrip_blocks=True)
    md_env = jinja2.Environment(loader=loader, autoescape=False, trim_blocks=True, lstrip_blocks=True)
    html = html_env.get_template("report.html.j2").render(
        **context, src=lambda p: "data:image/png;base64," + base64.b64encode(p.png).decode("ascii")
    )
    markdown = md_env.get_template("report.md.j2").render(**context, src=lambda p: f"report_files/{p.name}")
    html_path, md_path = out / "report.html", out / "report.md"
    html_path.write_text(html, encoding="utf-8")
    md_path.write_text(markdown, encoding="utf-8")
    return html_path, md_path


def build_report(out: Path, *, run_ids: tuple[str, ...] = (), experiment: tuple[str, ...] = (), filter_string: str = "",
                 max_runs: int = 50, sweep: str | None = None, comparison: str | None = None,
                 mlflow_url: str | None = None, title: str | None = None) -> tuple[Path, Path]:  # fmt: skip
    """Write OUT/report.html and OUT/report.md about the selected runs; return both paths."""
    client = tracking.store_client()
    runs = collect.select_runs(
        client,
        run_ids=run_ids,
        experiments=experiment,
        filter_string=filter_string,
        max_runs=max_runs,
        sweep=sweep,
        comparison=comparison,
    )
    selection = ", ".join(f"{k} {v}" for k, v in (("runs", " ".join(run_ids)), ("experiment", ", ".join(experiment)),
                                                  ("filter", filter_string), ("sweep", sweep),
                                                  ("comparison", comparison)) if v)  # fmt: skip
    sections, pictures = gather(client, runs, mlflow_url)
    title = title or (f"Report: {', '.join(experiment)}" if experiment else f"Report of {len(runs)} runs")
    html, md = write_report(Path(out), title, runs, sections=sections, pictures=pictures, selection=selection)
    present = [name for name, section in sections.items() if section]
    print(f"=> report of {len(runs)} runs ({', '.join(present)}): {html} and {md}")
    return html, md
