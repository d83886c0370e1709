"""Keeping secrets secret: owner-only files, passwords redacted from what is printed, and child
processes that get only the environment they need.

    private_dir(path)                 a folder only its owner can enter (0700)
    write_private(path, text)         a file only its owner can read (0600), never briefly wider
    redact(text)                      every URL password in `text` as ***
    child_environment(kind)           os.environ filtered by the allow-list of that kind of child

Children and what they get (a variable not listed is not passed on):
    torchserve  the base list only: TorchServe runs handler code from archives, and a handler
                must not find the tracking login or cloud keys in its environment
    mlflow      the base list, the server's own MLFLOW_* settings (no client login), and the cloud
                credentials of the store its artifacts go to (s3:// -> AWS_*, ...)
    training    the base list, MLFLOW_* (the run's login: workers log the run) and cloud
                credentials (a store that writes artifacts to a bucket directly needs them)
The base list: the system's (PATH, HOME, locale, TMPDIR, CA bundles, Java, Python), the math and
device libraries' settings (CUDA_*, OMP_*, TORCH_*, ATEN_*, ONEDNN_*, ...) and dlops' own DLOPS_*
settings. Whatever its
prefix, a name that says it holds a secret (PASSWORD, SECRET, TOKEN, KEY, CREDENTIAL) is dropped
unless the kind names it.

Standard library only: the serving container runs it as it is.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

from serving import environment

BASE = (
    "PATH", "HOME", "USER", "LOGNAME", "SHELL", "LANG", "LANGUAGE", "TZ", "TERM", "TMPDIR", "TEMP", "TMP",
    "VIRTUAL_ENV", "PYTHONPATH", "PYTHONUNBUFFERED", "PYTHONHASHSEED", "PYTHONDONTWRITEBYTECODE", "JAVA_HOME",
    "LD_LIBRARY_PATH", "XDG_CACHE_HOME", "SSL_CERT_FILE", "SSL_CERT_DIR", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE",
    "NO_PROXY", "no_proxy",
)  # fmt: skip
BASE_PREFIXES = (
    "LC_", "CUDA_", "NVIDIA_", "NCCL_", "GLOO_", "OMP_", "MKL_", "KMP_", "OPENBLAS_", "ATEN_", "ONEDNN_", "DNNL_",
    "TORCH_", "TORCHINDUCTOR_", "TRITON_", "PYTORCH_", "DLOPS_",
)  # fmt: skip
PROXIES = ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy")  # may carry a login: not for TorchServe
CLOUD_CREDENTIALS = {
    "s3": ("AWS_",),
    "gs": ("GOOGLE_", "GCLOUD_"),
    "wasbs": ("AZURE_",),
    "abfss": ("AZURE_",),
}
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|KEY|CREDENTIAL|PASSWD", re.IGNORECASE)
# MLflow's client-side logins: the tracking server never needs a client's
MLFLOW_CLIENT_LOGIN = (environment.TRACKING_USERNAME, environment.TRACKING_PASSWORD, environment.TRACKING_TOKEN)


def private_dir(path: Path) -> Path:
    """`path` (and missing parents) created, and `path` itself made owner-only (0700)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o700)
    return path


def write_private(path: Path, text: str) -> Path:
    """Write `text` to `path` readable by its owner only (0600), from the first byte on."""
    path = Path(path)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(descriptor, 0o600)  # a file that existed keeps its mode through open(): set it
    with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
        handle.write(text)
    return path


# scheme://user:password@host: the password may hold '@' or ':' itself (the greedy match ends at the
# last '@' before the host), never whitespace or '/' after the host
URL_LOGIN = re.compile(
    r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^\s:/@]*):(?P<password>\S+)@(?P<host>[^\s@/]+)"
)


def redact(text: str) -> str:
    """`text` with the password of every URL in it replaced by ***."""
    return URL_LOGIN.sub(lambda m: f"{m['scheme']}{m['user']}:***@{m['host']}", str(text))


def _cloud_prefixes(store_uri: str | None) -> tuple[str, ...]:
    scheme = (store_uri or "").partition("://")[0].lower()
    return CLOUD_CREDENTIALS.get(scheme, ())


def _allowed(name: str, kind: str, store_uri: str | None) -> bool:
    if name in BASE:
        return True
    secret = bool(SECRET_NAME.search(name))
    if name.startswith(BASE_PREFIXES) and not secret:
        return True
    if kind in ("torchserve", "gateway", "prometheus"):  # archive code, a proxy, a scraper: nothing beyond the base
        return False
    if name in PROXIES:
        return True
    if kind == "mlflow":
        if name.startswith("MLFLOW_"):
            return name not in MLFLOW_CLIENT_LOGIN
        return name.startswith(_cloud_prefixes(store_uri))
    if kind == "training":  # a scheduler's variables say the nodes (training/distributed.py)
        cloud = tuple(prefix for prefixes in CLOUD_CREDENTIALS.values() for prefix in prefixes)
        return name.startswith(("MLFLOW_", "SLURM_", "SKYPILOT_", *cloud)) or name in ("MASTER_PORT", "LOGLEVEL")
    raise ValueError(f"unknown kind of child process {kind!r}")


def child_environment(kind: str, *, store_uri: str | None = None, extra: Mapping[str, str] | None = None,
                      environ: Mapping[str, str] | None = None) -> dict[str, str]:  # fmt: skip
    """The environment for a child process of `kind` (torchserve, gateway, prometheus, mlflow, training): the
    allow-listed part of `environ` (default os.environ), then `extra`. `store_uri`: where an MLflow server's
    artifacts go."""
    source = os.environ if environ is None else environ
    chosen = {name: value for name, value in source.items() if _allowed(name, kind, store_uri)}
    return {**chosen, **(extra or {})}
