"""HTTP clients of one TorchServe, found by its state dir: inference, management, keys that survive renewal.

    server = ServerClient.of(Path("logs/torchserve"))      # ports from the state dir's server.json
    answer = server.predict_file("resnet", Path("cat.jpg"), {"X-TopK": "3"})   # Answer(status, data, headers)
    server.management("GET", "/models/resnet")
    teammate = ServerClient.remote("http://10.1.2.3:8080", key)  # another machine: a URL and a handed-over key

Every call carries the key of its API from the state dir's key_file.json. When TorchServe refuses
a key (the keeper may just have renewed it, or it expired), the call reads the file again, renews
an expired key through TorchServe's token API, and retries once; a key still refused after that
is answered with an error that says where the current keys are.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import socket
import ssl
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from serving import environment
from serving.keys import REFUSED, KeyFileError, key_file, read_keys, renew
from serving.tls import client_context

SERVER_FILE = "server.json"  # written by `dlops serve`: the server's URLs, model store and settings
DEFAULT_PORTS = {"inference": 8080, "management": 8081, "metrics": 8082}
# every answer of our handlers names the version and the worker process that computed it, and its request id
# (the prediction log's key; handler_common.py sets them; it imports nothing of the project): lower case, as
# Answer.headers has them
VERSION_HEADER, WORKER_HEADER = "x-dlops-model-version", "x-dlops-worker"
REQUEST_ID_HEADER = "x-dlops-request-id"
UNIX_PREFIX = "unix:"  # an API on a Unix socket: unix:/absolute/path.sock (TorchServe's own notation)


@dataclass(kw_only=True, frozen=True)
class Answer:
    status: int
    data: Any  # decoded JSON, or text
    headers: dict[str, str] = field(default_factory=dict)  # names in lower case

    @property
    def ok(self) -> bool:
        return self.status == 200


def read_server_file(state_dir: Path) -> dict[str, Any]:
    path = Path(state_dir) / SERVER_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _decode(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return raw.decode("utf-8", errors="replace")


def _lower(headers: Any) -> dict[str, str]:
    return {k.lower(): v for k, v in headers.items()}


class _UnixConnection(http.client.HTTPConnection):
    """HTTP over a Unix socket: a fleet's servers listen on sockets in their owner-only state dirs."""

    def __init__(self, path: str, timeout: float):
        super().__init__("localhost", timeout=timeout)
        self.path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.path)


def _send_unix(socket_path: str, method: str, path: str, *, body: bytes | None, headers: dict[str, str],
               timeout_s: float) -> Answer:  # fmt: skip
    connection = _UnixConnection(socket_path, timeout_s)
    try:
        connection.request(method, path, body=body, headers=headers)
        response = connection.getresponse()
        return Answer(status=response.status, data=_decode(response.read()), headers=_lower(response.headers))
    finally:
        connection.close()


def _refused(answer: Answer) -> bool:
    return answer.status in (400, 401, 403) and REFUSED in json.dumps(answer.data)


@dataclass(kw_only=True, frozen=True)
class ServerClient:
    state_dir: Path | None  # None: a client on another machine, with the URL and key it was handed
    urls: dict[str, str]  # inference, management, metrics -> http://127.0.0.1:PORT (https with TLS)
    inference_key: str | None = None  # a handed-over key (`dlops keys show` on the server's machine)
    cafile: str | None = None  # the CA an https server is checked against (default: serving/tls.py's choice)

    @classmethod
    def remote(cls, url: str, key: str | None, cafile: Path | str | None = None) -> ServerClient:
        """The inference API at `url` with `key`: what a teammate has, without the server's state dir."""
        return cls(state_dir=None, urls={"inference": url.rstrip("/")}, inference_key=key,
                   cafile=str(cafile) if cafile else None)  # fmt: skip

    def _key(self, api: str) -> str | None:
        if self.state_dir is None:
            return self.inference_key if api == "inference" else None
        keys = read_keys(self.state_dir)
        return keys[api].value if api in keys else None

    @classmethod
    def of(cls, state_dir: Path, **ports: int | None) -> ServerClient:
        """The server whose state dir is `state_dir`; `inference=PORT` etc. override what it recorded."""
        record = read_server_file(state_dir)
        recorded = record.get("urls", {})
        urls = {api: recorded.get(api, f"http://127.0.0.1:{port}") for api, port in DEFAULT_PORTS.items()}
        for api, port in ports.items():
            if port:
                urls[api] = f"{urllib.parse.urlsplit(urls[api]).scheme}://127.0.0.1:{port}"
        ca = record.get("ca")  # relative: inside the state dir (a container's, seen through its bind mount)
        return cls(state_dir=Path(state_dir), urls=urls, cafile=str(Path(state_dir) / ca) if ca else None)

    def _context(self, url: str) -> ssl.SSLContext | None:
        """TLS settings for `url`: the server's certificate checked against the CA; the name too, except for
        this machine's own server over loopback (its certificate need not name 127.0.0.1)."""
        if not url.startswith("https://"):
            return None
        context = client_context(self.cafile)
        context.check_hostname = self.state_dir is None
        return context

    # --- transport ---------------------------------------------------------------------------------
    def _send(self, api: str, method: str, path: str, *, body: bytes | None, headers: dict[str, str],
              timeout_s: float) -> Answer:  # fmt: skip
        headers = dict(headers)
        key = self._key(api)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        if self.urls[api].startswith(UNIX_PREFIX):
            return _send_unix(self.urls[api].removeprefix(UNIX_PREFIX), method, path, body=body, headers=headers,
                              timeout_s=timeout_s)  # fmt: skip
        url = f"{self.urls[api]}{path}"
        request = urllib.request.Request(url, data=body, headers=headers, method=method)
        try:
            with urllib.request.urlopen(request, timeout=timeout_s, context=self._context(url)) as response:  # noqa: S310
                return Answer(status=response.status, data=_decode(response.read()), headers=_lower(response.headers))
        except urllib.error.HTTPError as e:
            return Answer(status=e.code, data=_decode(e.read()), headers=_lower(e.headers))

    def call(self, api: str, method: str, path: str, *, body: bytes | None = None,
             headers: dict[str, str] | None = None, timeout_s: float = 120.0) -> Answer:  # fmt: skip
        """One request to the `api` (inference or management) of this server, with its key."""
        answer = self._send(api, method, path, body=body, headers=headers or {}, timeout_s=timeout_s)
        if not _refused(answer):
            return answer
        if self.state_dir is None:  # a handed-over key: only the server's machine can give the current one
            error = (f"TorchServe at {self.urls[api]} refused the {api} key (wrong, renewed or expired): ask the "
                     "server's owner for the current one (`dlops keys show` there) and pass it as --key or "
                     f"{environment.INFERENCE_KEY}")  # fmt: skip
            return Answer(
                status=answer.status,
                data={"error": error, "status": answer.status, "server_said": answer.data},
                headers=answer.headers,
            )
        refused_key = read_keys(self.state_dir).get(api)
        if refused_key is not None and refused_key.expires_in() <= 0:
            with contextlib.suppress(KeyFileError, OSError):  # expired, no keeper renewed it: renew it now
                renew(self.state_dir, self.urls["management"], api)
        # the key is read again: a renewed one is in the file now
        retried = self._send(api, method, path, body=body, headers=headers or {}, timeout_s=timeout_s)
        if not _refused(retried):
            return retried
        error = (f"TorchServe refused the {api} key (wrong or expired). The current keys of this server are in "
                 f"{key_file(self.state_dir)}, renewed while it runs; send `Authorization: Bearer <key>` with the "
                 "key of this API")  # fmt: skip
        return Answer(
            status=retried.status,
            data={"error": error, "status": retried.status, "server_said": retried.data},
            headers=retried.headers,
        )

    def management(self, method: str, path: str, timeout_s: float = 120.0) -> Answer:
        return self.call("management", method, path, timeout_s=timeout_s)

    # --- inference ---------------------------------------------------------------------------------
    def predict(self, model: str, body: bytes, content_type: str, *, headers: dict[str, str] | None = None,
                version: str | None = None, timeout_s: float = 120.0) -> Answer:  # fmt: skip
        path = f"/predictions/{model}" + (f"/{version}" if version else "")
        return self.call(
            "inference",
            "POST",
            path,
            body=body,
            headers={"Content-Type": content_type, **(headers or {})},
            timeout_s=timeout_s,
        )

    def predict_file(self, model: str, path: Path, headers: dict[str, str] | None = None) -> Answer:
        """A file's bytes as the request body (an image to a classifier)."""
        return self.predict(model, Path(path).read_bytes(), "application/octet-stream", headers=headers)

    def predict_fields(self, model: str, fields: dict[str, Any], version: str | None = None) -> Answer:
        """A JSON request of named fields (bytes travel base64-encoded), as a job's example request is."""
        body = {k: base64.b64encode(v).decode("ascii") if isinstance(v, bytes) else v for k, v in fields.items()}
        return self.predict(model, json.dumps(body).encode("utf-8"), "application/json", version=version)
