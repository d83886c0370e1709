"""Every contract named once: a metric, a tag, a journal record's kind, an environment variable or an
artifact path is the string constant of one module, and the code elsewhere uses that name, never
the literal (a literal written twice is two contracts that drift apart)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from tests.conftest import REPO
from tests.test_layers import string_literals

# The modules that name contracts: each string constant assigned at their top level (NAME = "...",
# A, B = "...", "..."), each record kind and each Metric(name=...) in them is a contract they own.
NAMING_MODULES = (
    "training/metrics.py",  # what every run and sweep logs
    "training/tracking/tags.py",  # run and version tags
    "training/tracking/artifacts.py",  # a run's folder and artifacts
    "training/tracking/records.py",  # the journal's key for a record's kind ("op")
    "serving/environment.py",  # environment variables
    "training/jobs/resnet/metrics.py",  # the classifier's metrics
    "training/jobs/resnet/compare.py",  # what a comparison run holds
    "training/jobs/lm/__init__.py",  # the language model's metrics
    "release/history.py",  # a deploy run's params and metrics
    "monitoring/runs.py",  # a drift or feedback check's params and metrics
)
ENVIRONMENT = re.compile(r"^(DLOPS|MLFLOW)_[A-Z0-9_]+$")  # a variable's name: named where it is assigned
CODE = ("training", "release", "serving", "monitoring", "scripts", "bench")
# A literal equal to a contract outside its module, on purpose: "path:literal" -> why
EXCEPTIONS: dict[str, str] = {
    "serving/handlers/handler_common.py:DLOPS_TORCH_THREADS": "handlers import nothing of the project",
    "serving/handlers/handler_common.py:DLOPS_SERVE_AMP": "handlers import nothing of the project",
    "serving/handlers/prediction_log.py:DLOPS_PREDICTION_LOG": "handlers import nothing of the project",
    "serving/handlers/prediction_log.py:DLOPS_PREDICTION_SAMPLE": "handlers import nothing of the project",
    "serving/handlers/prediction_log.py:DLOPS_PREDICTION_LOG_MB": "handlers import nothing of the project",
    "training/hardware.py:DLOPS_CPU_NATIVE_BF16": "shipped inside every .mar as dlops_hardware.py: imports nothing",
    # the same spelling, another contract: PyTorch's optimizer key param_groups[i]["lr"], a job's state
    # and recipes' option named lr, the UI's params column; the metric is training.metrics.LR
    "training/trainer.py:lr": "PyTorch's param_groups key",
    "training/jobs/lm/loop.py:lr": "PyTorch's param_groups key",
    "training/jobs/lm/__init__.py:lr": "PyTorch's param_groups key and the job's resumable state",
    "training/jobs/resnet/recipes.py:lr": "the --lr option a recipe sets",
    "bench/recipe_budget.py:lr": "PyTorch's param_groups key",
    "scripts/screenshots.py:lr": "the MLflow UI's column of the lr param",
    "training/report/collect.py:registered_model": "the --registered-model option, a param",
    "training/sweep.py:registered_model": "the --registered-model option a trial does not vary",
    "training/tracking/users.py:registered_model": "MLflow's permission resource kind",
    "training/jobs/resnet/weights.py:checkpoints": "torch.hub's folder of downloaded weights",
    "scripts/docker_check.py:monitor": "the CLI's command `dlops monitor drift`",
    "scripts/docker_check.py:drift": "the CLI's command `dlops monitor drift`",
}


def named_strings(node: ast.stmt) -> list[str]:
    """The strings a top-level statement names: NAME = "..." or A, B = "...", "..." with upper-case names
    (a tuple assigned to one name is a list of choices, not a contract)."""
    if not isinstance(node, ast.Assign | ast.AnnAssign) or node.value is None:
        return []
    target = node.targets[0] if isinstance(node, ast.Assign) else node.target
    unpacked = isinstance(target, ast.Tuple) and isinstance(node.value, ast.Tuple)
    pairs = zip(target.elts, node.value.elts, strict=True) if unpacked else [(target, node.value)]
    return [value.value for name, value in pairs
            if isinstance(name, ast.Name) and name.id.isupper()
            and isinstance(value, ast.Constant) and isinstance(value.value, str)]  # fmt: skip


def module_constants(path: Path) -> list[str]:
    """A naming module's contracts: its top-level constants and the names of its metrics."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    named = [text for node in tree.body for text in named_strings(node)]
    return named + [keyword.value.value for node in ast.walk(tree)
                    if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "Metric"
                    for keyword in node.keywords if keyword.arg == "name"]  # fmt: skip


def environment_names(files: list[Path]) -> tuple[dict[str, str], list[str]]:
    """Variable names assigned at a module's top level (NAME = "DLOPS_..."), and those assigned twice."""
    owners: dict[str, list[str]] = {}
    for path in files:
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            for text in named_strings(node):
                if ENVIRONMENT.match(text):
                    owners.setdefault(text, []).append(str(path.relative_to(REPO)))
    twice = [f"{name} named in {', '.join(where)}" for name, where in owners.items() if len(set(where)) > 1]
    return {name: where[0] for name, where in owners.items()}, twice


def test_no_contract_is_written_outside_the_module_that_names_it():
    files = sorted(path for folder in CODE for path in (REPO / folder).rglob("*.py"))
    owners: dict[str, set[str]] = {}  # a contract -> the modules that name it (a word may name two)
    for module in NAMING_MODULES:
        for text in module_constants(REPO / module):
            owners.setdefault(text, set()).add(module)
    environment, twice = environment_names(files)
    for name, module in environment.items():
        owners.setdefault(name, set()).add(module)
    assert not twice, "\n".join(twice)
    assert len(owners) >= 80, len(owners)
    stray, excused = [], set()
    for path in files:
        relative = str(path.relative_to(REPO))
        for line, text in string_literals(path, command_names=False):
            if f"{relative}:{text}" in EXCEPTIONS:
                excused.add(f"{relative}:{text}")
                continue
            if relative in owners.get(text, ()) or (text not in owners and not ENVIRONMENT.match(text)):
                continue
            where = f"named in {', '.join(sorted(owners[text]))}" if text in owners else "named nowhere"
            stray.append(f"{relative}:{line}: {text!r} ({where})")
    assert not stray, "contracts written as literals:\n" + "\n".join(stray)
    assert excused == set(EXCEPTIONS), f"exceptions no longer needed: {sorted(set(EXCEPTIONS) - excused)}"
