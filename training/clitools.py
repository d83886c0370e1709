"""Click pieces that `dlops`'s own commands and the jobs' commands share: checkpoint sources, option
groups, the client of a running TorchServe."""

from __future__ import annotations

import json
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from serving import environment
from serving.client import Answer, ServerClient
from serving.server import DEFAULT_STATE_DIR
from serving.tls import is_loopback
from training.tracking.registry import URI_FORMS, is_model_uri, parse_model_uri


class CheckpointSource(click.ParamType):
    """A checkpoint file, or a model URI (resolved, and downloaded, by the command)."""

    name = "CKPT|MODEL_URI"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        text = str(value)
        if is_model_uri(text):
            try:
                parse_model_uri(text)
            except ValueError as e:
                self.fail(str(e), param, ctx)
        elif not Path(text).is_file():
            self.fail(f"{text!r}: no such checkpoint file (or give {URI_FORMS})", param, ctx)
        return text


CHECKPOINT = CheckpointSource()


class Duration(click.ParamType):
    """A span of time as seconds: 90, 90s, 30m, 1h, 2d."""

    name = "duration"
    UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        if isinstance(value, int | float):
            return float(value)
        text = str(value).strip().lower()
        factor = self.UNITS.get(text[-1:], None)
        try:
            seconds = float(text[:-1] if factor else text) * (factor or 1)
        except ValueError:
            seconds = -1.0
        if seconds <= 0:
            self.fail(f"{value!r} is not a duration (e.g. 90s, 30m, 1h, 2d)", param, ctx)
        return seconds


def options(*decorators: Callable) -> Callable:
    """One decorator applying several click options: a group of options declared once."""

    def decorate(function: Callable) -> Callable:
        for decorator in reversed(decorators):
            function = decorator(function)
        return function

    return decorate


state_dir_option = click.option(
    "--state-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=DEFAULT_STATE_DIR,
    show_default=True,
    help="the server's folder: its config, ports, keys, logs and what it serves",
)

_pem = click.Path(dir_okay=False, exists=True, path_type=Path)
# A server that leaves loopback presents a certificate: made for it, or given; plain HTTP only on request
tls_options = options(
    click.option("--tls", type=click.Choice(["off", "auto"]), default="off", show_default=True,
                 help="auto: a CA (made once) and a certificate for every name this server answers to, in its "
                 "state dir's tls/; or give --tls-cert and --tls-key"),
    click.option("--tls-cert", type=_pem, default=None,
                 help="the server's certificate (PEM, with its chain): yours, or `dlops tls init`'s"),
    click.option("--tls-key", type=_pem, default=None, help="its private key (PEM)"),
    click.option("--insecure-http", is_flag=True,
                 help="off loopback without TLS, on purpose: logins, keys and requests cross the network in clear"),
)  # fmt: skip

client_options = options(
    state_dir_option,
    click.option(
        "--inference-port",
        type=click.IntRange(1, 65535),
        default=None,
        help="default: the one the server of --state-dir was started with",
    ),
    click.option("--url", envvar=environment.INFERENCE_URL, default=None, metavar="URL",
                 help="a server on another machine: its inference API, e.g. https://10.1.2.3:8080 (instead of "
                 "--state-dir) [env DLOPS_INFERENCE_URL]"),
    click.option("--key", envvar=environment.INFERENCE_KEY, default=None,
                 help="the inference key handed over with --url (`dlops keys show` on the server's machine); "
                 "better in its variable or --key-file than on a command line [env DLOPS_INFERENCE_KEY]"),
    click.option("--key-file", envvar=environment.INFERENCE_KEY_FILE, default=None,
                 type=click.Path(dir_okay=False, exists=True, path_type=Path),
                 help="a file holding that key [env DLOPS_INFERENCE_KEY_FILE]"),
    click.option("--ca", envvar=environment.INFERENCE_CA, default=None,
                 type=click.Path(dir_okay=False, exists=True, path_type=Path),
                 help="the CA an https --url's certificate is checked against (the stack's ca.pem) [default: "
                 "$REQUESTS_CA_BUNDLE or $SSL_CERT_FILE, else the system's]"),
    click.option("--insecure-http", is_flag=True,
                 help="send the key to an http:// --url on another machine anyway (in clear)"),
)  # fmt: skip


def server_client(*, state_dir: Path, inference_port: int | None, url: str | None, key: str | None,
                  key_file: Path | None = None, ca: Path | None = None,
                  insecure_http: bool = False) -> ServerClient:  # fmt: skip
    """The client of --url with --key (another machine), else of the server started from --state-dir. A key
    is not sent in clear to another machine unless --insecure-http says so."""
    if key_file is not None:
        key = key_file.read_text(encoding="utf-8").strip()
    if url:
        host = urllib.parse.urlsplit(url).hostname or ""
        if url.startswith("http://") and key and not is_loopback(host) and not insecure_http:
            raise click.UsageError(f"--url {url} is plain HTTP: the key would cross the network in clear. Use the "
                                   "server's https:// URL (with --ca), or say --insecure-http on purpose")  # fmt: skip
        return ServerClient.remote(url, key, cafile=ca)
    if key:
        raise click.UsageError("--key goes with --url (a server on this machine is reached through --state-dir)")
    return ServerClient.of(state_dir, inference=inference_port)


def show_answer(answer: Answer) -> None:
    """Print a server answer as JSON; fail the command unless it is HTTP 200."""
    click.echo(json.dumps(answer.data, indent=1, ensure_ascii=False))
    if not answer.ok:
        raise click.ClickException(f"HTTP {answer.status}")
