"""Thin HTTP clients for the served models (`make predict`, `make generate-http`)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from serving.server import read_keys


def post(
    url: str, body: bytes, content_type: str, state_dir: Path, headers: dict[str, str] | None = None
) -> tuple[int, Any]:
    """POST to TorchServe, with the inference token when auth is on; return (status, decoded JSON)."""
    headers = {"Content-Type": content_type, **(headers or {})}
    token = read_keys(state_dir).get("inference")
    if token:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        raw = e.read()
        try:
            return e.code, json.loads(raw)
        except json.JSONDecodeError:
            return e.code, raw.decode("utf-8", errors="replace")


def predict_image(
    image: Path, port: int, state_dir: Path, topk: int | None = None, model: str = "resnet"
) -> tuple[int, Any]:
    url = f"http://127.0.0.1:{port}/predictions/{model}"
    headers = {"X-TopK": str(topk)} if topk else {}
    return post(url, image.read_bytes(), "application/octet-stream", state_dir, headers)


def generate_http(request: dict, port: int, state_dir: Path, model: str = "lm") -> tuple[int, Any]:
    url = f"http://127.0.0.1:{port}/predictions/{model}"
    return post(url, json.dumps(request).encode("utf-8"), "application/json", state_dir)
