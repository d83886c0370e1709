"""The layers import downward only: the order below is the one place it is written down.

A module may import modules of its own layer and of the layers below it, never above: data flows
data -> models -> loops -> jobs -> trainer -> tracking's consumers -> packaging -> serving's commands,
and the CLI sits on top. Type-only imports (under TYPE_CHECKING) count too: they are how a layer
starts to lean on the one above.
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import REPO

# From the top. A name covers its package and everything in it; the longest matching name wins.
LAYERS: list[tuple[str, ...]] = [
    ("training.cli", "serving.container"),  # entry points: parse options, call the layers below
    ("training.sweep", "training.report", "training.analysis", "training.doctor", "serving.deploy"),
    ("training.trainer", "training.evaluate", "training.generate", "serving.package"),
    ("training.session",),  # one training run's checkpoints and tracking
    ("training.jobs",),  # the declarations the trainer runs
    ("training.loops",),  # epoch functions: no MLflow, no files
    ("training.tracking",),  # journal -> sender -> MLflow; the registry
    ("training.data", "training.models", "training.plots", "training.recipes"),
    ("training.runtime", "training.checkpoint", "training.stopping", "training.devices", "training.distributed"),
    ("training.hardware", "training.options", "training"),  # capability facts; option declarations
    # serving's runtime knows nothing of training; handlers import nothing of the project at all
    ("serving.server", "serving.client", "serving.keys", "serving.served", "serving.handlers", "serving"),
]


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
        found.update(n for n in names if n.split(".")[0] in ("training", "serving"))
    return found


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_every_import_points_down_the_layers():
    upward = []
    for path in sorted([*(REPO / "training").rglob("*.py"), *(REPO / "serving").rglob("*.py")]):
        module = module_name(path)
        for imported in project_imports(path):
            if layer_of(imported) < layer_of(module):
                upward.append(f"{module} (layer {layer_of(module)}) imports {imported} (layer {layer_of(imported)})")
    assert not upward, "imports that point up the layers:\n" + "\n".join(upward)


def test_handlers_import_nothing_of_the_project():
    """A .mar (and an MLflow model) loads where this project is not installed."""
    for path in (REPO / "serving" / "handlers").glob("*.py"):
        assert not project_imports(path), f"{path.name} imports {project_imports(path)}"
