"""The serving container's entry point: `dlops serve`'s server, in the foreground, for compose.

    python -m serving.container          (docker/Dockerfile.serve; settings from DLOPS_SERVE_* variables)
    python -m serving.container --health (its HEALTHCHECK)
    python -m serving.container --member ts-1   (one server of a fleet, serving/fleet.py: DLOPS_FLEET_DIR)
    python -m serving.container --gateway       (the fleet's gateway: HAProxy in front of DLOPS_FLEET_MEMBERS)

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

from serving import environment, gateway
from serving.client import SERVER_FILE, ServerClient
from serving.fleet import MEMBERS_DIR, Fleet, member_options, open_gateway
from serving.keys import process_alive
from serving.served import last_archives, serving_now
from serving.server import TRUSTED_CA, ServeOptions, running_pid, start, stop, wait_listening

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


def tls_settings(state_dir: Path) -> dict[str, Path]:
    """The certificate and key (compose secrets) the inference and metrics APIs present, from
    DLOPS_SERVE_TLS_CERT/_KEY; the CA (DLOPS_SERVE_TLS_CA) is copied into `state_dir`, where the
    host's clients, reading the same bind mount, find it."""
    cert, key, ca = (os.environ.get(f"{environment.SERVE_TLS_PREFIX}{name}") for name in ("CERT", "KEY", "CA"))
    if not (cert and key):
        return {}
    settings = {"tls_cert": Path(cert), "tls_key": Path(key)}
    if ca:
        state_dir.mkdir(parents=True, exist_ok=True)
        copied = state_dir / TRUSTED_CA
        copied.write_bytes(Path(ca).read_bytes())
        settings["tls_ca"] = copied
    return settings


def _settings() -> dict:
    """What every server of the container takes from its variables."""
    return {"model_store": MODEL_STORE, "torch_threads": int(os.environ.get(environment.SERVE_TORCH_THREADS, "1")),
            "amp": os.environ.get(environment.SERVE_AMP, "auto"),
            "prediction_sample": float(os.environ.get(environment.SERVE_LOG_SAMPLE, "0.1"))}  # fmt: skip


def _run_until_stopped(pid: int | None, stop_all) -> int:
    """Wait while process `pid` runs; SIGTERM or SIGINT (`docker stop`) ends it through `stop_all`."""
    stopping: list[int] = []
    signal.signal(signal.SIGTERM, lambda signum, frame: stopping.append(signum))
    signal.signal(signal.SIGINT, lambda signum, frame: stopping.append(signum))
    while pid and process_alive(pid) and not stopping:
        time.sleep(1)
    print(stop_all(), flush=True)
    return 0 if stopping else 1  # the server ending on its own is a failure the restart policy should see


def fleet_member(name: str) -> int:
    """One server of the fleet in DLOPS_FLEET_DIR: its APIs on Unix sockets in the shared folder (the gateway's
    container and the host's `dlops deploy` reach them there), with what the fleet serves."""
    fleet_dir = Path(os.environ[environment.FLEET_DIR])
    options = member_options(ServeOptions(state_dir=fleet_dir, **_settings()), fleet_dir / MEMBERS_DIR / name)
    if fleet_dir.resolve() not in Path(options.sockets).parents:
        raise SystemExit(f"{fleet_dir} is too long a path for Unix sockets: mount the fleet's folder at a shorter one")
    state = fleet_dir / MEMBERS_DIR / name
    start(options, last_served(fleet_dir, MODEL_STORE), allow_empty=True)
    return _run_until_stopped(running_pid(state), lambda: stop(state))


def fleet_gateway() -> int:
    """HAProxy in front of the members named in DLOPS_FLEET_MEMBERS, once each answers, on DLOPS_FLEET_PORT of
    the container's interface (compose publishes it); TLS with DLOPS_SERVE_TLS_*."""
    fleet_dir = Path(os.environ[environment.FLEET_DIR])
    members = os.environ[environment.FLEET_MEMBERS].split(",")
    port = int(os.environ.get(environment.FLEET_PORT, "8090"))
    for name in members:  # the members start in their own containers: wait for each to answer
        while not (fleet_dir / MEMBERS_DIR / name / SERVER_FILE).is_file():
            time.sleep(1)
        wait_listening(ServerClient.of(fleet_dir / MEMBERS_DIR / name), timeout_s=300)
    options = ServeOptions(state_dir=fleet_dir, inference_address="0.0.0.0", inference_port=port,  # noqa: S104
                           metrics_port=port + 2, **_settings(), **tls_settings(fleet_dir))  # fmt: skip
    fleet = Fleet(state_dir=fleet_dir, members=members, address=options.inference_address, port=port,
                  metrics_port=options.metrics_port)  # fmt: skip
    versions = [(d.model, d.version) for d in serving_now(fleet_dir)]
    pid = open_gateway(fleet, options, versions)
    return _run_until_stopped(pid, lambda: gateway.stop(fleet.gateway_dir))


def main() -> int:
    if sys.argv[1:] == ["--health"]:
        return healthy()
    if sys.argv[1:2] == ["--member"]:
        return fleet_member(sys.argv[2])
    if sys.argv[1:] == ["--gateway"]:
        return fleet_gateway()
    options = ServeOptions(
        state_dir=STATE_DIR,
        # the container's own interface: compose publishes inference on ${BIND_ADDRESS:-127.0.0.1}, management on
        # the host's 127.0.0.1 only, metrics on ${METRICS_BIND_ADDRESS:-127.0.0.1}
        inference_address="0.0.0.0",  # noqa: S104
        management_address="0.0.0.0",  # noqa: S104
        metrics_address="0.0.0.0",  # noqa: S104
        token_expiration_min=float(os.environ.get(environment.SERVE_TOKEN_MINUTES, "1440")),
        **_settings(),
        **tls_settings(STATE_DIR),
    )
    mars = last_served(STATE_DIR, MODEL_STORE)
    start(options, mars, allow_empty=True)
    return _run_until_stopped(running_pid(STATE_DIR), lambda: stop(STATE_DIR))


if __name__ == "__main__":
    sys.exit(main())
