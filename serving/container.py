"""The serving container's entry point: `dlops serve`'s server, in the foreground, for compose.

    python -m serving.container          (docker/Dockerfile.serve; settings from DLOPS_SERVE_* variables)
    python -m serving.container --health (its HEALTHCHECK)

It starts TorchServe exactly as `dlops serve` does (serving/server.py: auth on, keys renewed while
it runs, the management API limited to the model store, per-model batching from each .mar; TLS on
the published APIs with the certificate DLOPS_SERVE_TLS_CERT/_KEY name), with
two differences a container needs: the APIs listen on the container's interface (compose publishes
them on the host's 127.0.0.1 only), and it starts with what its state dir served last, or with no
model at all: `dlops deploy` on the host adds them, no restart. The state dir and the model store
are bind mounts, so host clients find the keys (key_file.json) and the ports (server.json) there.
SIGTERM (`docker stop`) stops TorchServe and the keeper and exits 0.

Standard library only (and the serving/ modules it imports): the image carries no training code.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

from serving import environment
from serving.keys import process_alive
from serving.served import last_archives
from serving.server import TRUSTED_CA, ServeOptions, running_pid, start, stop

STATE_DIR = Path(os.environ.get(environment.SERVE_STATE_DIR, "/home/model-server/state"))
MODEL_STORE = Path(os.environ.get(environment.SERVE_MODEL_STORE, "/home/model-server/model-store"))


def last_served(state_dir: Path, store: Path) -> list[Path]:
    """The archives the state dir's serving.json names as serving (serving/served.py's record)."""
    return list(last_archives(state_dir, store).values())


def healthy() -> int:
    """The image's HEALTHCHECK: /ping answers 200, with the server's own key (the inference API needs one)."""
    from serving.client import ServerClient

    try:
        return 0 if ServerClient.of(STATE_DIR).call("inference", "GET", "/ping", timeout_s=4).ok else 1
    except OSError:
        return 1


def tls_settings() -> dict[str, Path]:
    """The certificate and key (compose secrets) the inference and metrics APIs present, from
    DLOPS_SERVE_TLS_CERT/_KEY; the CA (DLOPS_SERVE_TLS_CA) is copied into the state dir, where the
    host's clients, reading the same bind mount, find it."""
    cert, key, ca = (os.environ.get(f"{environment.SERVE_TLS_PREFIX}{name}") for name in ("CERT", "KEY", "CA"))
    if not (cert and key):
        return {}
    settings = {"tls_cert": Path(cert), "tls_key": Path(key)}
    if ca:
        STATE_DIR.mkdir(parents=True, exist_ok=True)
        copied = STATE_DIR / TRUSTED_CA
        copied.write_bytes(Path(ca).read_bytes())
        settings["tls_ca"] = copied
    return settings


def main() -> int:
    if sys.argv[1:] == ["--health"]:
        return healthy()
    options = ServeOptions(
        model_store=MODEL_STORE,
        state_dir=STATE_DIR,
        # the container's own interface: compose publishes inference on ${BIND_ADDRESS:-127.0.0.1}, management on
        # the host's 127.0.0.1 only, metrics on ${METRICS_BIND_ADDRESS:-127.0.0.1}
        inference_address="0.0.0.0",  # noqa: S104
        management_address="0.0.0.0",  # noqa: S104
        metrics_address="0.0.0.0",  # noqa: S104
        token_expiration_min=float(os.environ.get(environment.SERVE_TOKEN_MINUTES, "1440")),
        torch_threads=int(os.environ.get(environment.SERVE_TORCH_THREADS, "1")),
        amp=os.environ.get(environment.SERVE_AMP, "auto"),
        **tls_settings(),
    )
    mars = last_served(STATE_DIR, MODEL_STORE)
    start(options, mars, allow_empty=True)
    stopping: list[int] = []
    signal.signal(signal.SIGTERM, lambda signum, frame: stopping.append(signum))
    signal.signal(signal.SIGINT, lambda signum, frame: stopping.append(signum))
    pid = running_pid(STATE_DIR)
    while pid and process_alive(pid) and not stopping:
        time.sleep(1)
    print(stop(STATE_DIR), flush=True)
    return 0 if stopping else 1  # TorchServe ending on its own is a failure the restart policy should see


if __name__ == "__main__":
    sys.exit(main())
