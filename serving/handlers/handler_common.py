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
(X-Dlops-Model-Version, X-Dlops-Worker), which `dlops deploy` reads to drain an old version, and
its request id (X-Dlops-Request-Id), the key of the prediction log (prediction_log.py) and of
`dlops feedback`. Per request, TorchServe's metrics get its status and the batch's time in the
handler, labelled with the model version (metrics.yaml: DlopsRequests, DlopsLatencySeconds).
Shipped inside each .mar and MLflow model: it imports only the standard library and torch.
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from pathlib import Path
from typing import Any

import torch
from prediction_log import PredictionLog
from request_fields import BadRequest, non_finite_path

log = logging.getLogger(__name__)
__all__ = ["BadRequest", "BaseHandler", "error_answer", "form_field", "json_object", "request_body"]

# Keys under which TorchServe hands over a request body: raw body, or common multipart field names.
BODY_KEYS = ("body", "data", "file", "image")
VERSION_HEADER, WORKER_HEADER = "X-Dlops-Model-Version", "X-Dlops-Worker"
REQUEST_ID_HEADER = "X-Dlops-Request-Id"


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
    prediction_log = PredictionLog(None, sample=0.0, cap_bytes=0, model="", version="")
    summarizing = False  # summaries are made only while someone reads them (the log; a reference profile)
    summaries: list[dict | None] = []  # answer(): each request's summary (None for a failed one)

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
        self.prediction_log = PredictionLog.from_environment(context.manifest["model"]["modelName"], self.version)
        self.summarizing = self.prediction_log.on
        start_counters(context, self.version)
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

    def summarize(self, inputs: list[Any], answers: list[Any]) -> list[dict]:
        """What the prediction log and the drift check keep of each answered request, right after infer:
        {"input": numbers the job picks (an image's size and colours, a prompt's length), "answer": ...};
        JSON-ready, compact, never the raw input. Default: nothing but the answer's first class."""
        return [{"input": {}, "answer": answer_class(answer)} for answer in answers]

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
        results = self.infer_each(inputs)
        for i, answer in zip(indices, results, strict=True):
            answers[i] = answer
        self.summaries = [None] * len(requests)
        if self.summarizing:
            for i, summary in zip(indices, self.summarize_answered(inputs, results), strict=True):
                self.summaries[i] = summary
        return answers

    def summarize_answered(self, inputs: list[Any], results: list[Any]) -> list[dict | None]:
        """The summaries of the answered inputs; a failure here costs the summaries, never the answers."""
        answered = [i for i, result in enumerate(results) if not isinstance(result, Exception)]
        summaries: list[dict | None] = [None] * len(inputs)
        try:
            made = self.summarize([inputs[i] for i in answered], [results[i] for i in answered])
            for i, summary in zip(answered, made, strict=True):
                summaries[i] = summary
        except Exception:  # noqa: BLE001 - a summary is never worth a request
            log.exception("summarizing a batch of %d failed; its requests are answered without a record", len(inputs))
        return summaries

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
        started = time.perf_counter()
        fields: list = []
        for i, request in enumerate(data):
            try:
                headers = {k.lower(): v for k, v in context.get_all_request_header(i).items() if isinstance(v, str)}
                fields.append(self.parse(request, headers))
            except Exception as e:  # any bad input answers that request only
                fields.append(e)
        good = [f for f in fields if not isinstance(f, Exception)]
        answered, summaries = iter(self.answer(good)), iter(self.summaries)
        answers, records = [], []
        for i, item in enumerate(fields):
            result = item if isinstance(item, Exception) else next(answered)
            summary = None if isinstance(item, Exception) else next(summaries)
            answers.append(error_answer(context, i, result) if isinstance(result, Exception) else result)
            request_id = context.get_request_id(i) or uuid.uuid4().hex
            context.set_response_header(i, VERSION_HEADER, self.version)
            context.set_response_header(i, WORKER_HEADER, str(os.getpid()))
            context.set_response_header(i, REQUEST_ID_HEADER, request_id)
            if summary is not None and self.prediction_log.sampled():
                records.append({"id": request_id, "version": self.version, **summary})
        seconds = time.perf_counter() - started
        count_requests(context, answers, self.version, seconds)
        now = time.time()
        self.prediction_log.append([{**record, "time": round(now, 3), "latency_ms": round(seconds * 1000, 2)}
                                    for record in records])  # fmt: skip
        return answers


def answer_class(answer: Any) -> Any:
    """The class an answer names first: a top-k list's first "class" (classifiers), else None."""
    if isinstance(answer, list) and answer and isinstance(answer[0], dict):
        return {"class": answer[0].get("class"), "probability": answer[0].get("probability")}
    return None


def start_counters(context: Any, version: str) -> None:
    """Each status's request counter at 0 from the start: Prometheus's rate() counts a series' increases,
    and a series first seen at 5 (the first five 400s) would show no error at all."""
    metrics = getattr(context, "metrics", None)
    if metrics is None:
        return
    from ts.metrics.dimension import Dimension

    for status in (200, *PHRASES):  # the dimensions in the order metrics.yaml declares them
        dimensions = [Dimension("Status", str(status)), Dimension("Version", version),
                      Dimension("ModelName", context.model_name), Dimension("Level", "Model")]  # fmt: skip
        metrics.add_counter("DlopsRequests", 0, None, dimensions)


def count_requests(context: Any, answers: list, version: str, seconds: float) -> None:
    """Per-model metrics for the metrics endpoint, labelled with the version: requests by the status we
    answered, each request's time in the handler (its batch's: a histogram, so p50/p99 by version), and
    batches."""
    metrics = getattr(context, "metrics", None)
    if metrics is None:  # outside TorchServe (tests that run the handler directly)
        return
    from ts.metrics.dimension import Dimension
    from ts.metrics.metric_type_enum import MetricTypes

    statuses: dict[int, int] = {}
    for answer in answers:
        status = answer["status"] if isinstance(answer, dict) and "error" in answer else 200
        statuses[status] = statuses.get(status, 0) + 1
    for status, count in statuses.items():
        metrics.add_counter(
            "DlopsRequests", count, None, [Dimension("Status", str(status)), Dimension("Version", version)]
        )
    for _ in answers:
        metrics.add_metric("DlopsLatencySeconds", seconds, "s", None, [Dimension("Version", version)],
                           MetricTypes.HISTOGRAM)  # fmt: skip
    metrics.add_counter("DlopsBatches", 1, None, [])
