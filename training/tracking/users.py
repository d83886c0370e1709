"""Teammates on the tracking server: logins and their rights, through MLflow's own auth API.

    dlops users add alice --role editor      # as the admin (MLFLOW_TRACKING_USERNAME=admin ...)
    dlops users set-role alice --role reader

Three roles, each a role of MLflow's auth app in its default workspace that holds one permission on
every experiment and registered model ("*"):
    reader    READ: search and open runs, models and artifacts; change nothing
    editor    EDIT: also start runs, log to them, register versions; delete nothing, move no alias
              of a model it did not create
    promoter  an editor who may also move any model's aliases (what serves): the server checks the
              role itself (training/tracking/auth_app.py)
Deleting (and granting) stays with each resource's creator (MANAGE) and the admin.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

from mlflow.exceptions import MlflowException
from mlflow.server.auth.client import AuthServiceClient

from serving.secrets import redact
from training.tracking.store import refusals_explained, tracking_uri

WORKSPACE = "default"
RESOURCES = ("experiment", "registered_model")
ROLES = {"reader": "READ", "editor": "EDIT", "promoter": "EDIT"}


def role_name(role: str) -> str:
    """The MLflow role that stands for dlops role `role` (the auth app checks dlops-promoter by name)."""
    return f"dlops-{role}"


@dataclass(kw_only=True, frozen=True)
class NewUser:
    name: str
    role: str
    password: str
    generated: bool  # the password was made here: show it once


def _role_id(client: AuthServiceClient, role: str) -> int:
    """The id of MLflow role `dlops-<role>`, created with its permissions on first use."""
    name = role_name(role)
    for existing in client.list_roles(WORKSPACE):
        if existing.name == name:
            return existing.id
    created = client.create_role(WORKSPACE, name, description=f"dlops {role}: {ROLES[role]} on every "
                                 f"{' and '.join(RESOURCES)}")  # fmt: skip
    for resource in RESOURCES:
        client.add_role_permission(created.id, resource, "*", ROLES[role])
    return created.id


def set_role(name: str, role: str, uri: str | None = None) -> None:
    """Give user `name` the rights of `role` (and only those of dlops' roles)."""
    if role not in ROLES:
        raise ValueError(f"role {role!r} is not one of {', '.join(ROLES)}")
    uri = uri or tracking_uri()
    client = AuthServiceClient(uri)
    with refusals_explained(uri):
        wanted = _role_id(client, role)
        held = {r.id for r in client.list_user_roles(name)}
        for other in ROLES:
            other_id = _role_id(client, other)
            if other_id != wanted and other_id in held:
                client.unassign_role(name, other_id)
        if wanted not in held:
            client.assign_role(name, wanted)


def add_user(name: str, role: str, password: str | None = None, uri: str | None = None) -> NewUser:
    """Create login `name` with `password` (or a random one) and the rights of `role`."""
    uri = uri or tracking_uri()
    if not uri.startswith(("http://", "https://")):
        raise ValueError(f"users live on a tracking server with logins; MLFLOW_TRACKING_URI is {redact(uri)}")
    generated = password is None
    password = password or secrets.token_urlsafe(12)
    with refusals_explained(uri):
        try:
            AuthServiceClient(uri).create_user(name, password)
        except MlflowException as e:
            if e.error_code == "RESOURCE_ALREADY_EXISTS":
                raise ValueError(f"user {name!r} exists already on {redact(uri)}; `dlops users set-role` changes "
                                 "their rights") from e  # fmt: skip
            raise
    set_role(name, role, uri)
    return NewUser(name=name, role=role, password=password, generated=generated)
