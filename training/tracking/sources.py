"""Where a model version's files may come from, checked on both sides before anything is fetched.

A version's source (or its MLflow model's artifact location) is written by whoever registered it,
and MLflow's artifact clients send the deployer's credentials to whatever host it names (the
tracking login to an http URL, cloud keys to a bucket). So:

- the tracking server registers only versions from its own artifacts (mlflow-artifacts:, runs:/,
  models:/, none naming another host) or from a store the admin lists (`dlops tracking-server
  --artifact-store s3://team-bucket/`, MLflow's MLFLOW_CREATE_MODEL_VERSION_SOURCE_VALIDATION_REGEX);
- a client downloads a version only from the tracking server itself, a listed store
  ($DLOPS_ARTIFACT_STORES, comma-separated), or, with a store on this machine, a local path;
  anything else is refused before a single request, naming the version and the host.
"""

from __future__ import annotations

import os
import re
import urllib.parse

from serving import environment
from serving.secrets import redact

# This server's own artifacts: a URI without a host part (a `//host` would name another server)
OWN_SOURCES = (r"mlflow-artifacts:/(?!/)", r"mlflow-artifacts:///", r"runs:/(?!/)", r"models:/(?!/)")


class ForeignSource(ValueError):
    """A version whose files live somewhere this client or server does not trust."""


def artifact_stores(given: tuple[str, ...] | list[str] = ()) -> list[str]:
    """The trusted stores: `given` and $DLOPS_ARTIFACT_STORES, each a prefix ending in "/" (so that
    s3://team-bucket/ does not admit s3://team-bucket-of-someone-else/)."""
    listed = [*given, *os.environ.get(environment.ARTIFACT_STORES, "").split(",")]
    stores = []
    for store in (s.strip() for s in listed):
        if not store:
            continue
        if "://" not in store:
            raise ForeignSource(f"{store!r}: an artifact store is a URL prefix such as s3://team-bucket/models/")
        stores.append(store if store.endswith("/") else store + "/")
    return list(dict.fromkeys(stores))


def source_pattern(stores: tuple[str, ...] | list[str] = ()) -> str:
    """The regex the tracking server matches a new version's source against."""
    return "^(?:" + "|".join([*OWN_SOURCES, *(re.escape(s) for s in artifact_stores(stores))]) + ")"


def _is_http(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def check_location(location: str, *, tracking_uri: str, version: str, stores: list[str] | None = None) -> None:
    """Raise ForeignSource unless `location` (a resolved artifact URI of `version`, "NAME/N") is the
    tracking server's own, on a listed store, or a local path of a local store."""
    stores = artifact_stores() if stores is None else stores
    if any(location.startswith(store) for store in stores):
        return
    parts, tracking = urllib.parse.urlsplit(location), urllib.parse.urlsplit(tracking_uri)
    scheme = parts.scheme.lower()
    if scheme in ("", "file") and not _is_http(tracking_uri):
        return  # a store on this machine keeps its artifacts in local folders
    if scheme == "mlflow-artifacts" and (not parts.netloc or parts.netloc == tracking.netloc):
        return  # the tracking server's own artifact API (the login goes where it goes anyway)
    if (
        scheme in ("http", "https")
        and _is_http(tracking_uri)
        and (scheme, parts.netloc)
        == (
            tracking.scheme,
            tracking.netloc,
        )
    ):
        return
    where = parts.netloc or (f"a path on this machine ({parts.path})" if scheme in ("", "file") else scheme)
    trusted = ", ".join(stores) or "none"
    raise ForeignSource(
        f"model version {version}: its files are at {location}, on {where}, which is neither the tracking server "
        f"{redact(tracking_uri)} nor a trusted store (${environment.ARTIFACT_STORES}: {trusted}). Nothing was "
        "downloaded: a version's source is written by whoever registered it, and fetching it would send your "
        f"credentials there. If that store is your team's, list it in ${environment.ARTIFACT_STORES}"
    )
