"""The registry as the desired state: a controller that deploys, through a canary, the version a
registry alias points at.

    dlops serve --servers 2 --state-dir logs/fleet --follow champion

Every `interval_s` it reads, for each model the fleet serves from the registry, the version the alias
names; when that is not the version answering, it packages it and rolls it out with the canary
policy. A canary that aborts tags the version (`canary_aborted`) and the controller does not try that
version again; moving the alias to another version is the next try. Polling is enough at this scale:
one registry read per model per interval.
"""

from __future__ import annotations

import time
from pathlib import Path

from release.canary import CanaryPolicy, RolloutEnded, rollout
from release.deploy import DeployError, prepare
from release.package import ModelSettings
from serving import served
from serving.client import read_server_file
from serving.fleet import Fleet
from training.tracking import store_client
from training.tracking.tags import CANARY_ABORTED, SERVING_ALIAS


def wanted(fleet: Fleet, alias: str) -> dict[str, tuple[str, str]]:
    """TorchServe model -> (registered name, version the alias names) for every registered model served now."""
    client = store_client()
    found = {}
    for deployment in served.serving_now(fleet.state_dir):
        if not deployment.registered:
            continue
        name = deployment.registered.split("/")[0]
        try:
            version = client.get_model_version_by_alias(name, alias)
        except Exception:  # noqa: BLE001, S112 - no such alias (yet): nothing to follow for this model
            continue
        if CANARY_ABORTED in version.tags:
            continue
        found[deployment.model] = (name, str(version.version))
    return found


def follow_once(fleet: Fleet, alias: str, policy: Path | None = None, *, settings: ModelSettings | None = None,
                serving_alias: str = SERVING_ALIAS, timeout_s: float = 180.0) -> list[str]:  # fmt: skip
    """One look at the registry; roll out what moved, through a canary with the policy its job declares (and
    the `policy` file's keys). Return what happened, a line per model acted on."""
    said = []
    store = Path(read_server_file(fleet.state_dir)["model_store"])
    for model, (name, version) in wanted(fleet, alias).items():
        now = served.current(fleet.state_dir, model)
        if now is not None and now.registered == f"{name}/{version}":
            continue
        print(f"=> {name}@{alias} moved to version {version}: rolling it out", flush=True)
        try:
            candidate = prepare(f"models:/{name}/{version}", store, settings)
            chosen = CanaryPolicy.for_job(candidate.kind, policy)
            deployed = rollout(fleet, candidate, policy=chosen, alias=serving_alias, timeout_s=timeout_s)
            said.append(f"{model}: {deployed.describe()} promoted")
        except RolloutEnded as e:
            if e.outcome == "interrupted":
                raise
            said.append(f"{model}: {name}/{version} {e.outcome}: {e}")
        except (DeployError, OSError, ValueError) as e:
            said.append(f"{model}: {name}/{version} not deployed: {e}")
        print(f"=> {said[-1]}", flush=True)
    return said


def follow(fleet: Fleet, alias: str, policy: Path | None = None, *, interval_s: float = 10.0,
           settings: ModelSettings | None = None, serving_alias: str = SERVING_ALIAS) -> None:  # fmt: skip
    """Follow `alias` until interrupted (Ctrl-C, SIGTERM: a canary under way ends with the stable version)."""
    print(f"=> following @{alias} every {interval_s:g} s (Ctrl-C stops)", flush=True)
    while True:
        try:
            follow_once(fleet, alias, policy, settings=settings, serving_alias=serving_alias)
        except RolloutEnded:
            raise  # interrupted: the stable version serves
        except Exception as e:  # noqa: BLE001 - the tracking server may be away for a while: try again later
            print(f"warning: could not read the registry ({e}); trying again in {interval_s:g} s", flush=True)
        time.sleep(interval_s)
