"""What every model of ours shares when it answers requests: loading, per-request errors, parsing.

    class MyHandler(BaseHandler):
        def build_model(self, model_config): ...       # nn.Module from the metadata's model_config
        def parse(self, request, headers): ...         # one HTTP request -> its named fields
        def prepare(self, fields): ...                 # named fields -> model input (or BadRequest)
        def infer(self, inputs): ...                   # every good request of the batch -> answers

Two hosts run a handler: TorchServe (`initialize(context)` reads meta.json and the weights from
the .mar, `handle(batch, context)` answers HTTP requests), and the MLflow pyfunc model
(mlflow_model.py: `load(meta, weights)`, then `answer(list of fields)`): both answer the same
request the same way. Each bad request of a batch gets its own 4xx JSON while the others are
served. Every answer carries the model version and the worker's process id as headers
(X-Dlops-Model-Version, X-Dlops-Worker), which `dlops deploy` reads to drain an old version.
Shipped inside each .mar and MLflow model: it imports only the standard library and torch.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from request_fields import BadRequest, non_finite_path

log = logging.getLogger(__name__)
__all__ = ["BadRequest", "BaseHandler", "error_answer", "form_field", "json_object", "request_body"]

# Keys under which TorchServe hands over a request body: raw body, or common multipart field names.
BODY_KEYS = ("body", "data", "file", "image")
VERSION_HEADER, WORKER_HEADER = "X-Dlops-Model-Version", "X-Dlops-Worker"


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
    """The body as a JSON object without NaN or Infinity; TorchServe decodes JSON bodies itself
    (with Python's json, which accepts NaN) and leaves malformed JSON as bytes."""
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
    bad = non_finite_path(body)
    if bad:
        raise BadRequest(f"'{bad}' is not a finite number (NaN and Infinity are refused)")
    return body


def error_answer(context: Any, index: int, error: Exception) -> dict:
    """Answer one request of a batch with a JSON error and its own status code."""
    status = error.status if isinstance(error, BadRequest) else 500
    context.set_response_status(status, PHRASES.get(status, "Error"), index)
    return {"error": str(error), "status": status}


class BaseHandler:
    """TorchServe calls initialize(context) once per worker, then handle(batch, context) per batch.

    `mixed_precision = True` lets a handler run its model under the precision `dlops serve --amp`
    resolves for the device (auto: bf16 on a GPU or a CPU with native bf16, else fp32), the same
    choice training makes (dlops_hardware.py is training/hardware.py).
    """

    mixed_precision = False
    version = ""

    def initialize(self, context: Any) -> None:
        properties = context.system_properties
        model_dir = Path(properties["model_dir"])
        torch.set_num_threads(int(os.environ.get("DLOPS_TORCH_THREADS", "1")))
        gpu = properties.get("gpu_id")
        use_gpu = gpu is not None and torch.cuda.is_available()
        device = torch.device("cuda", int(gpu)) if use_gpu else torch.device("cpu")
        meta = json.loads((model_dir / "meta.json").read_text(encoding="utf-8"))
        weights = torch.load(model_dir / context.manifest["model"]["serializedFile"], map_location="cpu",
                             weights_only=True)  # fmt: skip
        self.version = context.manifest["model"].get("modelVersion", "")
        self.load(meta, weights, device, os.environ.get("DLOPS_SERVE_AMP", "auto"))
        log.info("dlops handler %s running on %s, precision %s", type(self).__name__, self.device, self.amp)
        self.initialized = True

    def load(self, meta: dict, weights: dict, device: torch.device, amp: str = "off") -> None:
        """Build the model from its metadata and weights (the .mar's, or an MLflow model's checkpoint)."""
        self.meta, self.device = meta, device
        model = self.build_model(meta["model_config"])
        model.load_state_dict(weights)
        self.model = model.eval().to(device)
        self.amp = self._precision(amp) if self.mixed_precision else "off"
        self.setup()

    def _precision(self, requested: str) -> str:
        from dlops_hardware import cpu_facts, gpu_facts, resolve_amp

        gpu = gpu_facts(self.device.index or 0) if self.device.type == "cuda" else None
        choice = resolve_amp(requested, self.device.type, cpu_facts(), gpu)
        if choice.warning:
            log.warning(choice.warning)
        return choice.amp

    def autocast(self):
        """The model's precision for one forward pass."""
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.amp)
        return torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None)

    def build_model(self, model_config: dict) -> torch.nn.Module:
        raise NotImplementedError

    def setup(self) -> None:
        """Anything else the handler needs once (transforms, vocabulary)."""

    def parse(self, request: dict, headers: dict[str, str]) -> dict:
        """One TorchServe request (body, form fields, headers) -> its named fields."""
        return json_object(request_body(request))

    def prepare(self, fields: dict) -> Any:
        raise NotImplementedError

    def infer(self, inputs: list[Any]) -> list[Any]:
        raise NotImplementedError

    @torch.no_grad()
    def answer(self, requests: list[dict]) -> list:
        """Answers for requests given as named fields; a bad one gets its exception (a BadRequest
        names the field) in its place, the others are answered."""
        answers: list = [None] * len(requests)
        inputs, indices = [], []
        for i, fields in enumerate(requests):
            try:
                inputs.append(self.prepare(fields))
                indices.append(i)
            except Exception as e:  # any bad input answers that request only
                answers[i] = e
        for i, answer in zip(indices, self.infer_each(inputs), strict=True):
            answers[i] = answer
        return answers

    def infer_each(self, inputs: list[Any]) -> list[Any]:
        """The batch's answers; if the batch fails, each input alone, so that an input the checks let
        through and the model cannot answer fails its own request (500), not its neighbours'."""
        if not inputs:
            return []
        try:
            return self.infer(inputs)
        except Exception:
            log.exception("a batch of %d failed; answering its requests one at a time", len(inputs))
        answers: list = []
        for single in inputs:
            try:
                answers += self.infer([single])
            except Exception as e:  # this request's own failure
                answers.append(e)
        return answers

    @torch.no_grad()
    def handle(self, data: list[dict], context: Any) -> list:
        fields: list = []
        for i, request in enumerate(data):
            try:
                headers = {k.lower(): v for k, v in context.get_all_request_header(i).items() if isinstance(v, str)}
                fields.append(self.parse(request, headers))
            except Exception as e:  # any bad input answers that request only
                fields.append(e)
        good = [f for f in fields if not isinstance(f, Exception)]
        answered = iter(self.answer(good))
        answers = []
        for i, item in enumerate(fields):
            result = item if isinstance(item, Exception) else next(answered)
            answers.append(error_answer(context, i, result) if isinstance(result, Exception) else result)
            context.set_response_header(i, VERSION_HEADER, self.version)
            context.set_response_header(i, WORKER_HEADER, str(os.getpid()))
        count_requests(context, answers)
        return answers


def count_requests(context: Any, answers: list) -> None:
    """Per-model counters for the metrics endpoint: requests by the status we answered, and batches."""
    metrics = getattr(context, "metrics", None)
    if metrics is None:  # outside TorchServe (tests that run the handler directly)
        return
    from ts.metrics.dimension import Dimension

    statuses: dict[int, int] = {}
    for answer in answers:
        status = answer["status"] if isinstance(answer, dict) and "error" in answer else 200
        statuses[status] = statuses.get(status, 0) + 1
    for status, count in statuses.items():
        metrics.add_counter("DlopsRequests", count, None, [Dimension("Status", str(status))])
    metrics.add_counter("DlopsBatches", 1, None, [])
