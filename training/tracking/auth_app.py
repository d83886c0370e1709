"""The tracking server's app (`mlflow server --app-name dlops-auth`): MLflow's basic-auth app, with
promotion made a privilege that the server enforces.

Moving an alias decides what serves (`dlops deploy models:/NAME@champion`), so EDIT on a model is
not enough to do it: the request needs the model's MANAGE right (its creator has it) or the
`dlops-promoter` role, which the admin grants (`dlops users set-role NAME --role promoter`). The
same holds for what would move an alias by other means: renaming a model (a new model of the old
name takes over its URIs), moving a version's stage, and changing the recorded checkpoint digest
of a version (tags.CHECKPOINT_DIGEST). The admin passes every check, as in MLflow's app.

MLflow finds the app through the `mlflow.app` entry point in pyproject.toml; its workers import
this module, replace the validators of those routes, then build MLflow's own app.
"""

from __future__ import annotations

from collections.abc import Callable

from mlflow.server import auth

from training.tracking.tags import CHECKPOINT_DIGEST
from training.tracking.users import role_name

PROMOTER_ROLE = role_name("promoter")
# Routes (under /api/2.0/mlflow and /ajax-api/2.0/mlflow) that change what a model URI resolves to ...
PROMOTION_ROUTES = {
    ("/registered-models/alias", "POST"),
    ("/registered-models/alias", "DELETE"),
    ("/registered-models/rename", "POST"),
    ("/model-versions/transition-stage", "POST"),
}
# ... and those that change a version's tags, the recorded checkpoint digest among them
TAG_ROUTES = {("/model-versions/set-tag", "POST"), ("/model-versions/delete-tag", "DELETE")}


def holds_promotion_right() -> bool:
    """The requester manages the model named in the request, or holds the promoter role."""
    username = auth.authenticate_request().username
    if auth._get_permission_from_registered_model_or_prompt_name().can_manage:
        return True
    user = auth.store.get_user(username)
    return any(role.name == PROMOTER_ROLE for role in auth.store.list_user_roles(user.id))


def promotion(validator: Callable[[], bool]) -> Callable[[], bool]:
    """`validator` (MLflow's own check of the route), and then the promotion right."""

    def can_promote() -> bool:
        return validator() and holds_promotion_right()

    return can_promote


def digest_protected(validator: Callable[[], bool]) -> Callable[[], bool]:
    """A version tag change: MLflow's check, and the promotion right when the tag is the checkpoint digest."""

    def can_change_tag() -> bool:
        if not validator():
            return False
        return auth._request_params().get("key") != CHECKPOINT_DIGEST or holds_promotion_right()

    return can_change_tag


def guard_routes() -> None:
    """Put the promotion right on every route that can change what a model URI resolves to."""
    for (path, method), validator in list(auth.BEFORE_REQUEST_VALIDATORS.items()):
        route = (path.removeprefix("/ajax-api").removeprefix("/api").removeprefix("/2.0/mlflow"), method)
        if getattr(validator, "dlops_guarded", False):
            continue
        if route in PROMOTION_ROUTES:
            wrapped = promotion(validator)
        elif route in TAG_ROUTES:
            wrapped = digest_protected(validator)
        else:
            continue
        wrapped.dlops_guarded = True  # type: ignore[attr-defined]
        auth.BEFORE_REQUEST_VALIDATORS[(path, method)] = wrapped


def create_app():  # noqa: ANN201 - what MLflow's app factory returns (a Flask or ASGI app)
    """The factory MLflow's server calls in each worker."""
    guard_routes()
    return auth.create_app()
