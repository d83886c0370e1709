"""Assemble a report: select runs, gather each section, draw pictures, render HTML and Markdown.

report.html          one self-contained page: pictures embedded as data URIs, no network needed
report.md            the Markdown twin, its pictures in report_files/ beside it
"""

from __future__ import annotations

import base64
import datetime
import re
import urllib.parse
from pathlib import Path
from typing import Any

import jinja2
from markupsafe import Markup, escape

from training import tracking
from training.jobs import jobs
from training.plots import Picture
from training.report import collect
from training.report.pictures import learning_curves

TEMPLATES = Path(__file__).resolve().parent / "templates"


def _number(value: Any, digits: int = 2) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


# What Markdown would read as structure in a table cell or a heading: a run's name or a class label
# is text, never a link, emphasis, a cell border or raw HTML.
MARKDOWN_SPECIALS = re.compile(r"([\\`*_\[\]|#!])")


def markdown_text(value: Any) -> Any:
    """Every `{{ value }}` of the Markdown report: text escaped (HTML, then Markdown's specials, one
    line); numbers as they are; Markup (our own link targets and code blocks) untouched."""
    if value is None or isinstance(value, Markup | int | float):
        return value
    text = " ".join(str(escape(value)).split())
    return Markup(MARKDOWN_SPECIALS.sub(r"\\\1", text))


def markdown_link(url: str) -> Markup:
    """A link target: characters that would end or break `(...)` percent-encoded."""
    return Markup(urllib.parse.quote(str(url), safe=":/#?&=%.-_~+,;@!$'*"))


def code_block(text: str) -> Markup:
    """`text` fenced so that nothing in it closes the fence (a fence longer than its longest run of backticks)."""
    longest = max((len(run) for run in re.findall(r"`+", str(text))), default=0)
    fence = "`" * max(3, longest + 1)
    return Markup(f"{fence}\n{text}\n{fence}")


def gather(client, runs: list[collect.RunFacts], mlflow_url: str | None) -> tuple[dict[str, Any], list[Picture]]:
    sections: dict[str, Any] = {
        "overview": collect.overview_section(client, runs, mlflow_url),
        "curves": collect.curves_section(client, runs),
        "layers": collect.layers_section(client, runs),
        "evaluation": collect.evaluation_section(client, runs),
        "epochs": collect.epoch_tables_section(client, runs),
        "environment": collect.environment_section(runs),
        "deploys": collect.deployments_section(runs),
    }
    pictures: list[Picture] = []
    if sections["curves"]:
        curves = sections["curves"]
        curves["pictures"] = [learning_curves(curves["series"], job.kind, job.report.quality) for job in curves["jobs"]]
        pictures += curves["pictures"]
    # the jobs' own sections (the classifier's device benchmark and comparisons), where their runs are here
    job_sections = []
    for job in jobs().values():
        for section in job.report.sections:
            data = section.collect(client, runs)
            if data:
                job_sections.append((section, data))
                pictures += data.get("pictures", [])
    sections["jobs"] = job_sections
    return sections, pictures


def write_report(out: Path, title: str, runs: list[collect.RunFacts], *, sections: dict[str, Any],
                 pictures: list[Picture], selection: str) -> tuple[Path, Path]:  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    files = out / "report_files"
    files.mkdir(exist_ok=True)
    for picture in pictures:
        (files / picture.name).write_bytes(picture.png)
    context = {"title": title, "runs": runs, "sections": sections, "job_sections": sections["jobs"],
               "selection": selection, "number": _number,
               "generated_at": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
               "tracking_uri": tracking.tracking_uri()}  # fmt: skip
    folders = {str(section.templates) for section, _ in sections["jobs"]}
    loader = jinja2.FileSystemLoader([str(TEMPLATES), *sorted(folders)])
    html_env = jinja2.Environment(loader=loader, autoescape=True, trim_blocks=True, lstrip_blocks=True)
    md_env = jinja2.Environment(loader=loader, autoescape=False, trim_blocks=True, lstrip_blocks=True,
                                finalize=markdown_text)  # fmt: skip
    md_env.filters.update(link=markdown_link, code_block=code_block)
    html = html_env.get_template("report.html.j2").render(
        **context, src=lambda p: "data:image/png;base64," + base64.b64encode(p.png).decode("ascii")
    )
    markdown = md_env.get_template("report.md.j2").render(**context, src=lambda p: Markup(f"report_files/{p.name}"))
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
