"""Request parsing and per-request error answers shared by the TorchServe handlers.

Shipped inside each .mar next to the handler, so it imports only the standard library.
"""

from __future__ import annotations

import json
from typing import Any

# Keys under which TorchServe hands over a request body: raw body, or common multipart field names.
BODY_KEYS = ("body", "data", "file", "image")


class BadRequest(Exception):
    """A request the handler refuses; `status` is the 4xx code answered to that request alone."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


PHRASES = {400: "Bad Request", 413: "Payload Too Large", 500: "Internal Server Error"}


def request_body(request: dict) -> Any:
    """The body of one request: bytes, str (text/*) or an already decoded JSON value."""
    for key in BODY_KEYS:
        value = request.get(key)
        if value is not None:
            return value
    raise BadRequest("empty request: send the input as the request body or as a multipart field 'data'")


def form_field(request: dict, name: str) -> str | None:
    """A multipart form field sent beside the body, as text."""
    value = request.get(name)
    if isinstance(value, bytes | bytearray):
        return value.decode("utf-8", errors="replace")
    return None if value is None else str(value)


def json_object(body: Any) -> dict:
    """The body as a JSON object; TorchServe leaves malformed JSON as bytes."""
    if isinstance(body, dict):
        return body
    if isinstance(body, bytes | bytearray):
        try:
            body = body.decode("utf-8")
        except UnicodeDecodeError as e:
            raise BadRequest(f"body is not UTF-8 text: {e}") from e
    if isinstance(body, str):
        if not body.strip():
            raise BadRequest("empty request body: expected a JSON object")
        try:
            body = json.loads(body)
        except json.JSONDecodeError as e:
            raise BadRequest(f"malformed JSON: {e}") from e
    if not isinstance(body, dict):
        raise BadRequest(f"expected a JSON object, got {type(body).__name__}")
    return body


def bounded_int(value: Any, name: str, low: int, high: int) -> int:
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(f"'{name}' must be an integer, got {json.dumps(value)}")
    if not low <= value <= high:
        raise BadRequest(f"'{name}' must be between {low} and {high}, got {value}")
    return value


def bounded_float(value: Any, name: str, low: float, high: float, low_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BadRequest(f"'{name}' must be a number, got {json.dumps(value)}")
    if value < low or value > high or (low_open and value == low):
        bound = f"> {low}" if low_open else f">= {low}"
        raise BadRequest(f"'{name}' must be {bound} and <= {high}, got {value}")
    return float(value)


def error_answer(context: Any, index: int, error: Exception) -> dict:
    """Answer one request of a batch with a JSON error and its own status code."""
    status = error.status if isinstance(error, BadRequest) else 500
    context.set_response_status(status, PHRASES.get(status, "Error"), index)
    return {"error": str(error), "status": status}
