"""The package as shipped: the wheel, installed (not editable) into a fresh environment and run from a
folder outside the checkout, finds every file it reads at run time (report templates, TorchServe's
config and metrics files, the handlers a .mar ships)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from serving.server import ServeOptions
from tests.conftest import REPO
from training.data.synthetic import write_synthetic_corpus

JAVA = shutil.which("java") is not None


@pytest.fixture(scope="module")
def installed(module_tmp) -> Path:
    """A virtualenv holding the dlops wheel built from the tracked sources; its dependencies come from
    this environment's site-packages through a .pth line (a path line, so the editable install's own
    .pth files there are not run: `import training` can only find the wheel's copy)."""
    sources = module_tmp.mktemp("sources")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, sources)
    for package in ("training", "serving"):
        shutil.copytree(REPO / package, sources / package, ignore=shutil.ignore_patterns("__pycache__"))
    wheels = module_tmp.mktemp("wheels")
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(sources)], check=True)
    env_dir = module_tmp.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", "--clear", str(env_dir)], check=True)
    python = env_dir / "bin" / "python"
    (wheel,) = wheels.glob("dlops-*.whl")
    subprocess.run([*pip, "--python", str(python), "install", "--no-deps", str(wheel)], check=True)
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    (Path(site) / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return env_dir


def dlops(installed: Path, cwd: Path, *args, **kwargs) -> subprocess.CompletedProcess:
    """The installed `dlops` command, run from `cwd` (outside the checkout); the dependencies' commands
    (torchserve, torch-model-archiver) are found on PATH."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{installed / 'bin'}:{Path(sys.executable).parent}:{env.get('PATH', '')}"
    env.update({"MLFLOW_TRACKING_URI": f"sqlite:///{cwd / 'mlruns' / 'mlflow.db'}", "PYTHONUNBUFFERED": "1"})
    result = subprocess.run([str(installed / "bin" / "dlops"), *map(str, args)], cwd=cwd, env=env,
                            capture_output=True, text=True, timeout=600, **kwargs)  # fmt: skip
    assert result.returncode == 0, f"dlops {' '.join(map(str, args))}:\n{result.stdout[-3000:]}{result.stderr[-3000:]}"
    return result


def test_the_installed_package_is_not_the_checkout(installed, tmp_path):
    where = subprocess.run([str(installed / "bin" / "python"), "-c", "import training, serving; "
                            "print(training.__file__); print(serving.__file__)"], cwd=tmp_path,
                           capture_output=True, text=True, check=True).stdout.split()  # fmt: skip
    assert all(path.startswith(str(installed)) for path in where), where


@pytest.mark.skipif(not JAVA, reason="TorchServe needs Java (.ci/run installs it)")
def test_train_report_package_and_serve_from_the_wheel_outside_the_checkout(installed, tmp_path):
    corpus = write_synthetic_corpus(tmp_path / "corpus", 200, 30, 30)
    dlops(installed, tmp_path, "train", "lm", corpus, "--epochs", "1", "--emsize", "16", "--nhid", "16", "--nlayers",
          "1", "--bptt", "20", "--lr", "5", "--run-name", "from-the-wheel")  # fmt: skip
    (checkpoint,) = tmp_path.glob("runs/*/best.pt")

    dlops(installed, tmp_path, "report", "--experiment", "wordlm-wikitext2", "--out", "report")  # the templates
    assert "from-the-wheel" in (tmp_path / "report" / "report.html").read_text(encoding="utf-8")

    dlops(installed, tmp_path, "package", "lm", "--checkpoint", checkpoint, "--model-store", "store")  # the handlers
    (mar,) = (tmp_path / "store").glob("lm-*.mar")

    ports, port_options = ServeOptions.on_free_ports(), []  # the server's config and metrics files
    for api in ("inference", "management", "metrics", "grpc-inference", "grpc-management"):
        port_options += [f"--{api}-port", str(getattr(ports, f"{api.replace('-', '_')}_port"))]
    dlops(installed, tmp_path, "serve", "--model", mar, "--model-store", "store", "--state-dir", "ts", *port_options)
    try:
        answer = dlops(installed, tmp_path, "generate-http", "--state-dir", "ts", "--prompt", "the", "--max-words", "5",
                       "--seed", "1")  # fmt: skip
        assert json.loads(answer.stdout)["words"] == 5
    finally:
        dlops(installed, tmp_path, "stop", "--state-dir", "ts")
