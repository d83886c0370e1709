"""The package as shipped: the wheel, installed (not editable) into a fresh environment and run from a
folder outside the checkout, finds every file it reads at run time (report templates, TorchServe's
config and metrics files, the handlers a .mar ships); and a job from another package (examples/tabular),
installed beside it as a plug-in, goes through every command as the built-in jobs do."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from serving.client import ServerClient
from serving.server import ServeOptions
from tests.conftest import REPO, free_port
from training.jobs.lm.synthetic import write_synthetic_corpus

JAVA = shutil.which("java") is not None


@pytest.fixture(scope="module")
def installed(module_tmp) -> Path:
    """A virtualenv holding the dlops wheel built from the tracked sources; its dependencies come from
    this environment's site-packages through a .pth line (a path line, so the editable install's own
    .pth files there are not run: `import training` can only find the wheel's copy)."""
    sources = module_tmp.mktemp("sources")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, sources)
    for package in ("training", "serving", "release", "monitoring"):
        shutil.copytree(REPO / package, sources / package, ignore=shutil.ignore_patterns("__pycache__"))
    plugin = module_tmp.mktemp("plugin")
    shutil.copytree(REPO / "examples" / "tabular", plugin, dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("__pycache__", "build", "*.egg-info"))  # fmt: skip
    wheels = module_tmp.mktemp("wheels")
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    for project in (sources, plugin):
        subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(project)],
                       check=True)  # fmt: skip
    env_dir = module_tmp.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", "--clear", str(env_dir)], check=True)
    python = env_dir / "bin" / "python"
    subprocess.run([*pip, "--python", str(python), "install", "--no-deps", *map(str, wheels.glob("*.whl"))],
                   check=True)  # fmt: skip
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    (Path(site) / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return env_dir


def dlops(installed: Path, cwd: Path, *args, env: dict[str, str] | None = None, ok: bool = True,
          **kwargs) -> subprocess.CompletedProcess:  # fmt: skip
    """The installed `dlops` command, run from `cwd` (outside the checkout); the dependencies' commands
    (torchserve, torch-model-archiver) are found on PATH. `ok`: it must exit 0."""
    extra = env or {}
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{installed / 'bin'}:{Path(sys.executable).parent}:{env.get('PATH', '')}"
    env.update({"MLFLOW_TRACKING_URI": f"sqlite:///{cwd / 'mlruns' / 'mlflow.db'}", "PYTHONUNBUFFERED": "1", **extra})
    result = subprocess.run([str(installed / "bin" / "dlops"), *map(str, args)], cwd=cwd, env=env,
                            capture_output=True, text=True, timeout=600, **kwargs)  # fmt: skip
    said = f"dlops {' '.join(map(str, args))}:\n{result.stdout[-3000:]}{result.stderr[-3000:]}"
    assert (result.returncode == 0) == ok, said
    return result


def server_ports() -> list[str]:
    """--*-port options of five ports free on 127.0.0.1 now."""
    ports, options = ServeOptions.on_free_ports(), []
    for api in ("inference", "management", "metrics", "grpc-inference", "grpc-management"):
        options += [f"--{api}-port", str(getattr(ports, f"{api.replace('-', '_')}_port"))]
    return options


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

    # the server's config and metrics files
    dlops(installed, tmp_path, "serve", "--model", mar, "--model-store", "store", "--state-dir", "ts", *server_ports())
    try:
        answer = dlops(installed, tmp_path, "generate-http", "--state-dir", "ts", "--prompt", "the", "--max-words", "5",
                       "--seed", "1")  # fmt: skip
        assert json.loads(answer.stdout)["words"] == 5
        if shutil.which("prometheus"):  # the recording rules and the monitor page's template
            dlops(installed, tmp_path, "monitor", "prometheus", "start", "--state-dir", "ts", "--port", free_port(),
                  "--interval", "1")  # fmt: skip
            dlops(installed, tmp_path, "monitor", "--state-dir", "ts", "--out", "page")
            assert "Served models" in (tmp_path / "page" / "monitor.html").read_text(encoding="utf-8")
    finally:
        dlops(installed, tmp_path, "monitor", "prometheus", "stop", "--state-dir", "ts")
        dlops(installed, tmp_path, "stop", "--state-dir", "ts")


@pytest.mark.skipif(not JAVA, reason="TorchServe needs Java (.ci/run installs it)")
def test_a_job_from_another_package_goes_through_every_command(installed, tmp_path):
    """examples/tabular, installed as a plug-in: train -> report beside the built-in jobs' runs ->
    promote -> package -> serve -> deploy -> predict over HTTP -> rollback."""
    dlops(installed, tmp_path, "tabular-synth", "table", "--rows", "300")  # the job's own command
    for epochs in (2, 4):
        dlops(installed, tmp_path, "train", "tabular", "table", "--epochs", str(epochs), "--seed", str(epochs))
    write_synthetic_corpus(tmp_path / "corpus", 200, 30, 30)
    dlops(installed, tmp_path, "train", "lm", "corpus", "--epochs", "1", "--emsize", "16", "--nhid", "16",
          "--nlayers", "1", "--bptt", "20", "--lr", "5")  # fmt: skip
    dlops(installed, tmp_path, "data", "synth", "images", "--classes", "3", "--train-per-class", "8",
          "--val-per-class", "2")  # fmt: skip
    dlops(installed, tmp_path, "train", "resnet", "images", "--epochs", "1", "-b", "8", "-j", "0", "-p", "0")

    dlops(installed, tmp_path, "report", "--experiment", "tabular", "--experiment", "wordlm-wikitext2",
          "--experiment", "resnet-tinyimagenet", "--out", "report")  # fmt: skip
    html = (tmp_path / "report" / "report.html").read_text(encoding="utf-8")
    for column in ("best val accuracy", "best val ppl", "best val Acc@1", "MLP 2x64"):
        assert column in html, f"{column!r}: each job's runs with its own metrics"
    assert (tmp_path / "report" / "report_files" / "curves-tabular.png").stat().st_size > 10_000

    promoted = dlops(installed, tmp_path, "promote", "models:/tabular-mlp/2", "--alias", "champion", "--if-better")
    assert "@champion now points at tabular-mlp/2" in promoted.stdout
    dlops(installed, tmp_path, "package", "tabular", "--model-uri", "models:/tabular-mlp@champion", "--model-store",
          "store")  # fmt: skip
    assert (tmp_path / "store" / "tabular-2.mar").is_file()

    serving = ["--state-dir", "ts"]
    dlops(installed, tmp_path, "serve", "--model", "models:/tabular-mlp/1", "--model-store", "store", *serving,
          *server_ports())  # fmt: skip
    try:
        deployed = dlops(installed, tmp_path, "deploy", "models:/tabular-mlp/2", *serving)
        assert "=> serving tabular version 2" in deployed.stdout and "check passed" in deployed.stdout
        answer = json.loads(dlops(installed, tmp_path, "predict", "--model", "tabular", "35,25,10,2", "--field",
                                  "topk=2", *serving).stdout)  # fmt: skip
        assert len(answer) == 2 and {a["class"] for a in answer} <= {"letter", "parcel", "crate"}
        assert (
            abs(sum(a["probability"] for a in answer) - 1) < 0.5
            and answer[0]["probability"] >= answer[1]["probability"]
        )
        refused = dlops(installed, tmp_path, "predict", "--model", "tabular", "35,25", *serving, ok=False)
        assert "'row' needs 4 values" in refused.stdout, "a bad row is a 4xx naming what is wrong"
        server = ServerClient.of(tmp_path / "ts")
        for huge in (b"1" + b"0" * 400, b"1e39"):  # past any float; past the model's float32
            answer = server.predict("tabular", b'{"row": [' + huge + b", 25, 10, 2]}", "application/json")
            assert answer.status == 400 and "column 'length_cm'" in json.dumps(answer.data), answer
        rolled = dlops(installed, tmp_path, "rollback", "tabular", *serving)
        assert "=> serving tabular version 1" in rolled.stdout
    finally:
        dlops(installed, tmp_path, "stop", *serving)


def test_a_plug_in_that_fails_to_load_is_named_and_the_other_jobs_work(installed, tmp_path):
    """A distribution on the path whose dlops.jobs entry point raises on import."""
    broken = tmp_path / "broken"
    info = broken / "broken_job-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-job\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[dlops.jobs]\nbroken = broken_job:Job\n")
    (broken / "broken_job.py").write_text("raise ImportError('a dependency of this plug-in is missing')\n")
    env = {"PYTHONPATH": str(broken)}
    listed = dlops(installed, tmp_path, "train", "--help", env=env)
    assert "the job plug-in 'broken' (broken_job:Job) failed to load: ImportError: a dependency" in listed.stderr
    assert "tabular" in listed.stdout and "resnet" in listed.stdout, "the other jobs still work"
    refused = dlops(installed, tmp_path, "train", "broken", "data", env=env, ok=False)
    assert "failed to load: ImportError: a dependency of this plug-in is missing" in refused.stderr
    dlops(installed, tmp_path, "tabular-synth", "table", "--rows", "30", env=env)
    dlops(installed, tmp_path, "train", "tabular", "table", "--epochs", "1", env=env)
