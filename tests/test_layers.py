"""The layers import downward only: the order below is the one place it is written down.

A module may import modules of its own layer and of the layers below it, never above: data flows
data -> models -> loops -> jobs -> trainer -> tracking's consumers -> release (packaging, deploys),
and the CLI sits on top; serving's runtime (server, client, keys, handlers) is the bottom layer and
imports nothing of training. Type-only imports (under TYPE_CHECKING) count too: they are how a layer
starts to lean on the one above.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

from tests.conftest import REPO

# From the top. A name covers its package and everything in it; the longest matching name wins.
LAYERS: list[tuple[str, ...]] = [
    ("training.cli", "serving.container"),  # entry points: parse options, call the layers below
    # releasing a model reads checkpoints and job declarations (training) and drives a server (serving)
    # so does watching served versions (monitoring: Prometheus, the prediction log, drift, feedback)
    ("release", "monitoring", "training.sweep", "training.report", "training.doctor", "training.evaluation"),
    ("release.package", "release.priority", "training.trainer"),
    ("training.session",),  # one training run's checkpoints and tracking
    ("training.jobs",),  # the declarations the trainer runs, each job with its own commands (plug-ins)
    ("training.clitools",),  # Click pieces the CLI and the jobs' commands share
    ("training.loops",),  # epoch functions: no MLflow, no files
    ("training.tracking",),  # journal -> sender -> MLflow; the registry; the tracking server and its users
    ("training.data", "training.models", "training.plots"),
    ("training.runtime", "training.checkpoint", "training.stopping", "training.devices", "training.distributed"),
    ("training.hardware", "training.options", "training.metrics", "training"),  # capability facts; declarations
    # serving's runtime knows nothing of training; handlers import nothing of the project at all
    ("serving.server", "serving.client", "serving.keys", "serving.served", "serving.handlers", "serving"),
]


PACKAGES = ("training", "serving", "release", "monitoring")


def layer_of(module: str) -> int:
    matches = [(len(name), index) for index, names in enumerate(LAYERS) for name in names
               if module == name or module.startswith(name + ".")]  # fmt: skip
    assert matches, f"{module} is in no layer: add it to LAYERS in {Path(__file__).name}"
    return max(matches)[1]


def project_imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names = [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        found.update(n for n in names if n.split(".")[0] in PACKAGES)
    return found


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_every_import_points_down_the_layers():
    upward = []
    for path in sorted(path for package in PACKAGES for path in (REPO / package).rglob("*.py")):
        module = module_name(path)
        for imported in project_imports(path):
            if layer_of(imported) < layer_of(module):
                upward.append(f"{module} (layer {layer_of(module)}) imports {imported} (layer {layer_of(imported)})")
    assert not upward, "imports that point up the layers:\n" + "\n".join(upward)


def test_handlers_import_nothing_of_the_project():
    """A .mar (and an MLflow model) loads where this project is not installed: the shared handler code and
    every file a job's served model ships (its handler and model file) import nothing of it."""
    from training.jobs import jobs

    shipped = {*(REPO / "serving" / "handlers").glob("*.py")}
    shipped |= {path for job in jobs().values() if job.serving for path in job.serving.files()}
    assert len(shipped) > len(COMMON := list((REPO / "serving" / "handlers").glob("*.py"))), COMMON
    for path in sorted(shipped):
        assert not project_imports(path), f"{path.name} imports {project_imports(path)}"


def test_dataclasses_are_built_by_keyword():
    """A dataclass's constructor takes keywords only (kw_only=True): a swapped argument cannot pass silently."""
    positional = []
    for path in sorted(path for package in PACKAGES for path in (REPO / package).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.ClassDef):
                continue
            for decorator in node.decorator_list:
                target = decorator.func if isinstance(decorator, ast.Call) else decorator
                name = target.attr if isinstance(target, ast.Attribute) else getattr(target, "id", "")
                keywords = {k.arg: k.value for k in getattr(decorator, "keywords", [])}
                kw_only = isinstance(keywords.get("kw_only"), ast.Constant) and keywords["kw_only"].value is True
                if name == "dataclass" and not kw_only:
                    positional.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name}")
    assert not positional, "dataclasses without kw_only=True:\n" + "\n".join(positional)


# The built-in jobs' kinds and model names, which only their own files (and handlers, docs, tests) may name
# a kind, its job tag or model, or one of its metrics (val/acc1, best/val_ppl, perplexity, ...)
BUILT_IN_NAMES = re.compile(
    r"^(resnet|lm)$|train-(resnet|lm)|resnet-tinyimagenet|wordlm-wikitext2"
    r"|\bacc[15]\b|_acc[15]\b|\bppl\b|_ppl\b|perplexity|(images|tokens)_per_second"
)
JOBS_OWN = ("training/jobs/resnet/", "training/jobs/lm/")
# Where code outside a job names one on purpose, and why (a new one fails the test below): a module's
# literal as "path:literal", or a whole file or folder as its path
NAMING_EXCEPTIONS: dict[str, str] = {
    "bench/": "benchmarks of the two built-in models, run by hand",
    "scripts/": "the container check and the screenshots train and serve the two built-in models",
    "Makefile": "the documented targets train-resnet, train-lm, generate and their defaults",
    "docker/compose.yaml": "the trainer service's default command trains the ResNet",
}


def string_literals(path: Path, *, command_names: bool = True) -> list[tuple[int, str]]:
    """The string constants of a module's code (docstrings, which are documentation, left out; and
    the names of Click commands, `@main.command("evaluate")`, unless `command_names`)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    left_out = {id(node.body[0].value) for node in ast.walk(tree)
                if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
                and node.body and isinstance(node.body[0], ast.Expr)
                and isinstance(node.body[0].value, ast.Constant)}  # fmt: skip
    if not command_names:
        left_out |= {id(node.args[0]) for node in ast.walk(tree) if isinstance(node, ast.Call) and node.args
                     and getattr(node.func, "attr", "") in ("command", "group")}  # fmt: skip
    return [(node.lineno, node.value) for node in ast.walk(tree) if isinstance(node, ast.Constant)
            and isinstance(node.value, str) and id(node) not in left_out]  # fmt: skip


def test_nothing_outside_a_job_names_a_built_in_job():
    """Reports, sweeps, packaging, deploys and the client read job declarations: a third job works
    with them because none of them knows the first two by name."""
    named = []
    code = [path for folder in (*PACKAGES, "bench", "scripts") for path in (REPO / folder).rglob("*.py")]
    for path in sorted(code):
        relative = str(path.relative_to(REPO))
        if relative.startswith(JOBS_OWN) or relative.startswith(tuple(NAMING_EXCEPTIONS)):
            continue
        for line, text in string_literals(path):
            if BUILT_IN_NAMES.search(text) and f"{relative}:{text}" not in NAMING_EXCEPTIONS:
                named.append(f"{relative}:{line}: {text!r}")
    for path in (REPO / "Makefile", *sorted((REPO / "docker").iterdir())):
        relative = str(path.relative_to(REPO))
        if path.is_file() and relative not in NAMING_EXCEPTIONS:
            words = [w for line in path.read_text(encoding="utf-8").splitlines() if not line.lstrip().startswith("#")
                     for w in re.split(r"[\s\"',\[\]]+", line)]  # fmt: skip
            named += [f"{relative}: {w!r}" for w in words if BUILT_IN_NAMES.search(w)]
    assert not named, "a job's kind or model name outside its own files:\n" + "\n".join(named)


def test_functions_stay_short_enough_to_read():
    """No function or method over 60 lines (the trainer's steps are methods of one object)."""
    long = []
    for path in sorted(path for package in PACKAGES for path in (REPO / package).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.end_lineno - node.lineno >= 60:
                long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name}: {node.end_lineno - node.lineno + 1}")
    assert not long, "functions over 60 lines:\n" + "\n".join(long)


def test_the_development_page_lists_the_layers_in_this_order():
    """docs/development.md's layer table, row by row, names modules of LAYERS' layers in the same order."""
    page = (REPO / "docs" / "development.md").read_text(encoding="utf-8")
    table = page[page.index("| layer | modules |") :].split("\n\n")[0].splitlines()[2:]
    assert len(table) == len(LAYERS), f"{len(table)} rows for {len(LAYERS)} layers"
    for index, row in enumerate(table):
        for path in re.findall(r"`(\w+/[\w/]*(?:\.py)?)`", row.split("|")[2]):
            module = path.removesuffix(".py").rstrip("/").replace("/", ".")
            assert layer_of(module) == index, f"{path} is in layer {layer_of(module)}, its row is {index}"
