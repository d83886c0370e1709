"""The tracking store: where it is, reaching it, creating it once, and short synchronous runs.

Default store: a SQLite database in ./mlruns/ with artifacts under ./mlruns/artifacts/, so a
single folder holds everything. MLFLOW_TRACKING_URI overrides it (another SQLite file, or an
MLflow server over HTTP). Training runs log through a journal (training/tracking/run.py);
evaluate and compare, which take seconds, log directly (start_run below).
"""

from __future__ import annotations

import fcntl
import getpass
import importlib.metadata
import os
import platform
import ssl
import subprocess
import tempfile
import time
import urllib.error
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
import torch
import torchvision
from mlflow.entities import Metric, Param, Run, RunStatus, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_USER

from serving import environment
from serving.secrets import private_dir, redact
from serving.tls import CA_VARIABLES, urlopen
from training.tracking.artifacts import BEST_ARTIFACT

PROJECT_ROOT = Path(__file__).resolve().parent.parent.parent
DEFAULT_STORE_DIR = Path("mlruns")
REACH_TIMEOUT_S = 10.0  # how long start-up tries an HTTP tracking server before saying it is down
_initialized: set[str] = set()


class TrackingUnavailable(RuntimeError):
    """The tracking server cannot be reached; the message names the URI and what to do."""


class TrackingRefused(RuntimeError):
    """The tracking server answered with a refusal that asking again cannot change (wrong or missing
    login, no permission, a request it rejects); the message gives its answer and what to set."""


# HTTP answers that mean "not now" rather than "no": a timeout and too many requests
TRANSIENT_4XX = (408, 429)


def refusal_status(error: BaseException) -> int | None:
    """The HTTP status of a permanent refusal (400-499 but 408 and 429), else None: a connection
    error, a timeout or a 5xx is an outage, worth retrying."""
    if not isinstance(error, MlflowException):
        return None
    status = error.get_http_status_code()
    return status if 400 <= status < 500 and status not in TRANSIENT_4XX else None


def login_name() -> str:
    """Who starts runs: the tracking server's login (MLFLOW_TRACKING_USERNAME), else the OS user."""
    return os.environ.get(environment.TRACKING_USERNAME) or getpass.getuser()


def explain_refusal(uri: str, error: MlflowException, status: int) -> str:
    said = error.message.partition("Response body: ")[2].strip(" '") or error.message
    if status == 401:
        who = os.environ.get(environment.TRACKING_USERNAME)
        what = (f"refused the login of {who!r} (wrong password?)" if who else
                "asks for a login and none was given")  # fmt: skip
        return (
            f"the MLflow tracking server {redact(uri)} {what} (HTTP 401: {said}). Set MLFLOW_TRACKING_USERNAME and "
            "MLFLOW_TRACKING_PASSWORD to your login; the server's admin creates it with `dlops users add NAME`"
        )
    if status == 403:
        return (f"the MLflow tracking server {redact(uri)} refused user {login_name()!r} (HTTP 403: {said}): no "
                "permission for this experiment or model. The server's admin grants it: `dlops users set-role "
                f"{login_name()} --role editor` (moving an alias: --role promoter)")  # fmt: skip
    return f"the MLflow tracking server {redact(uri)} refused the request (HTTP {status}): {said}"


@contextmanager
def refusals_explained(uri: str) -> Iterator[None]:
    """Turn a server's permanent refusal into TrackingRefused, saying what the server said and what to set."""
    try:
        yield
    except MlflowException as e:
        status = refusal_status(e)
        if status is None:
            raise
        raise TrackingRefused(explain_refusal(uri, e, status)) from e


def check_access(uri: str) -> None:
    """One request that needs a login where the server asks for one: a refused login fails here,
    before anything else starts (/health, which check_reachable asks, needs none)."""
    if uri.startswith(("http://", "https://")):
        with refusals_explained(uri):
            MlflowClient(uri).search_experiments(max_results=1)


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI when set, else the SQLite store in ./mlruns/."""
    uri = os.environ.get(environment.TRACKING_URI)
    if uri:
        return uri
    private_dir(DEFAULT_STORE_DIR)  # runs, models and artifacts: the owner's only
    return f"sqlite:///{(DEFAULT_STORE_DIR / 'mlflow.db').resolve()}"


def _artifact_root(uri: str) -> str | None:
    """Keep a SQLite store's artifacts next to its database; servers choose their own."""
    if uri.startswith("sqlite:///"):
        return (Path(uri.removeprefix("sqlite:///")).parent / "artifacts").resolve().as_uri()
    return None


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def initialize_store(uri: str) -> None:
    """Create (or upgrade) a SQLite store once, under a lock: processes that start together on a
    fresh store would otherwise run MLflow's schema migrations at the same time and fail
    ("duplicate column name"). Other stores are created by their server."""
    if uri in _initialized or not uri.startswith("sqlite:///"):
        return
    database = Path(uri.removeprefix("sqlite:///"))
    with _file_lock(database.with_name(database.name + ".lock")):
        client = MlflowClient(uri)
        client.search_experiments(max_results=1)  # the tracking tables
        client.search_registered_models(max_results=1)  # the registry tables
        # owner-only: the database (SQLite gives its journals the same mode) and the artifacts beside it;
        # the folder around them may be anyone's (/tmp), so it is left as it is
        database.chmod(0o600)
        private_dir(Path(uri.removeprefix("sqlite:///")).parent / "artifacts")
    _initialized.add(uri)


def check_reachable(uri: str, timeout_s: float = REACH_TIMEOUT_S) -> None:
    """Fail within `timeout_s`, naming the URI and the variable, when an HTTP tracking server is down."""
    if not uri.startswith(("http://", "https://")):
        return
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urlopen(f"{uri.rstrip('/')}/health", timeout=min(3.0, timeout_s)):  # verifies TLS (serving/tls.py)
                return
        except urllib.error.HTTPError:
            return  # it answers; /health may be routed elsewhere behind a proxy
        except OSError as e:
            if isinstance(getattr(e, "reason", e), ssl.SSLError):  # it answers, with a certificate not trusted here
                raise TrackingUnavailable(
                    f"the MLflow tracking server {redact(uri)} presents a certificate this machine does not trust "
                    f"({getattr(e, 'reason', e)}): set MLFLOW_TRACKING_SERVER_CERT_PATH to the CA the server's "
                    f"admin hands over (its stack's ca.pem); read in this order: {', '.join(CA_VARIABLES)}"
                ) from e
            if time.monotonic() + 1 > deadline:
                raise TrackingUnavailable(
                    f"the MLflow tracking server {redact(uri)} (MLFLOW_TRACKING_URI) is unreachable: {e}. Start it, "
                    "point MLFLOW_TRACKING_URI at a running one, or train with --offline (DLOPS_OFFLINE=1) and deliver "
                    "the run later with `dlops sync RUN_DIR`"
                ) from e
            time.sleep(1.0)


def store_client() -> MlflowClient:
    """A client of the configured store (created on first use); the fluent API (mlflow.*) points there too."""
    uri = tracking_uri()
    initialize_store(uri)
    mlflow.set_tracking_uri(uri)
    return MlflowClient(uri)


def find_run(run_id: str) -> Run | None:
    """The run with this id in the configured store, or None; a refused login raises TrackingRefused."""
    try:
        return store_client().get_run(run_id)
    except MlflowException as e:
        if refusal_status(e) in (401, 403):
            raise TrackingRefused(explain_refusal(tracking_uri(), e, refusal_status(e))) from e
        return None


# The MLflow UI shows experiments of this kind in its "Model training" view (metric columns, charts),
# not the GenAI view it picks for experiments of no kind.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


def ensure_experiment(name: str, client: MlflowClient | None = None) -> str:
    """Id of the experiment called `name`, created on first use (as a model-training experiment)."""
    client = client or store_client()
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        root = _artifact_root(client.tracking_uri)
        try:
            experiment_id = client.create_experiment(name, artifact_location=f"{root}/{name}" if root else None,
                                                     tags=EXPERIMENT_KIND)  # fmt: skip
        except MlflowException:  # created concurrently by another process
            experiment_id = client.get_experiment_by_name(name).experiment_id
        return experiment_id
    if "mlflow.experimentKind" not in experiment.tags:  # made by an older dlops, or by hand
        client.set_experiment_tag(experiment.experiment_id, *next(iter(EXPERIMENT_KIND.items())))
    return experiment.experiment_id


def _git_commit() -> str:
    """The checkout's commit ("-dirty" with local changes); "installed" when the code is an installed
    package (whatever repository its site-packages may sit in is not this code's)."""
    if not (PROJECT_ROOT / ".git").exists():
        return "installed"
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=5, check=True
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=PROJECT_ROOT,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
        return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment_tags(device_name: str) -> dict[str, str]:
    """Software and hardware facts that explain a run's numbers."""
    return {
        "torch_version": torch.__version__,
        "torchvision_version": torchvision.__version__,
        "cuda_version": str(torch.version.cuda),
        "device_name": device_name,
        "cpu_count": str(os.cpu_count()),
        "python_version": platform.python_version(),
        "hostname": platform.node(),
        "git_commit": _git_commit(),
        "dlops_version": _dlops_version(),
    }


def _dlops_version() -> str:
    try:
        return importlib.metadata.version("dlops")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


@contextmanager
def ending(end: Callable[[str], None]) -> Iterator[None]:
    """Call `end(status)` on the way out: FINISHED, KILLED (Ctrl-C) or FAILED (anything else raised)."""
    status = RunStatus.FINISHED
    try:
        yield
    except KeyboardInterrupt:
        status = RunStatus.KILLED
        raise
    except BaseException:
        status = RunStatus.FAILED
        raise
    finally:
        end(RunStatus.to_string(status))


class DirectRun:
    """A short run logged synchronously (evaluate, compare): seconds long, nothing to survive."""

    def __init__(self, client: MlflowClient, run_id: str):
        self.client, self.run_id = client, run_id

    def log_params(self, params: Mapping[str, Any]) -> None:
        self.client.log_batch(self.run_id, params=[Param(k, str(v)) for k, v in params.items()])

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)


@contextmanager
def start_run(
    experiment: str, run_name: str | None = None, tags: Mapping[str, str] | None = None
) -> Iterator[DirectRun]:
    """A new run, ended FINISHED, FAILED or KILLED."""
    uri = tracking_uri()
    check_reachable(uri)
    client = store_client()
    with refusals_explained(uri):
        run = client.create_run(ensure_experiment(experiment), run_name=run_name,
                                tags={MLFLOW_USER: login_name(), **(tags or {})})  # fmt: skip
    with ending(lambda status: client.set_terminated(run.info.run_id, status)):
        yield DirectRun(client, run.info.run_id)


def register_model(
    run_id: str,
    artifact_path: str,
    name: str,
    tags: Mapping[str, str] | None = None,
    client: MlflowClient | None = None,
) -> str:
    """Register an artifact of a run as a version of model `name` (once: a version with the same
    run and source is reused); return the version."""
    client = client or store_client()
    try:
        client.create_registered_model(name)
    except MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    source = f"{client.get_run(run_id).info.artifact_uri}/{artifact_path}"
    for existing in client.search_model_versions(f"run_id = '{run_id}'"):
        if existing.name == name and existing.source == source:
            return existing.version
    version = client.create_model_version(name, source=source, run_id=run_id, tags=dict(tags or {}))
    return version.version


def download_run_checkpoint(run_id: str, workdir: Path, artifact: str = BEST_ARTIFACT) -> Path:
    """Download a run's logged checkpoint."""
    store_client()
    return Path(mlflow.artifacts.download_artifacts(artifact_uri=f"runs:/{run_id}/{artifact}", dst_path=str(workdir)))


def log_text_to_run(run_id: str, text: str, artifact_file: str) -> bool:
    """Add a text artifact to an existing run (its status untouched); False when the store lacks the run."""
    if find_run(run_id) is None:
        return False
    store_client().log_text(run_id, text, artifact_file)
    return True


def quiet_downloads() -> None:
    """No MLflow progress bar per artifact copied (small files, and many of them); a user's setting wins."""
    os.environ.setdefault(environment.ARTIFACTS_PROGRESS_BAR, "false")


def download_text(client: MlflowClient, run_id: str, path: str) -> str | None:
    """A run's text artifact, or None when it is not there."""
    quiet_downloads()  # one small file: no bar
    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = client.download_artifacts(run_id, path, tmp)
        except Exception:  # the artifact is not there
            return None
        return Path(local).read_text(encoding="utf-8", errors="replace")
